"""The original project's config-dict form, mapped onto arguments and strategy objects.

>>> from clm_hf.config import parse_config_dict
>>> args_kwargs, strategies = parse_config_dict({
...     "optimizer": {"type": "adam", "lr": 0.001},
...     "continual_strategy": {"ewc": {"enabled": True, "lambda": 100.0}},
... })
>>> args_kwargs["learning_rate"], strategies[0].config.ewc_lambda
(0.001, 100.0)
"""

from __future__ import annotations

from typing import Any

from .strategies.base import Strategy, _unknown_message, build_strategy
from .validation import RecipeError, as_bool, as_number, did_you_mean, validate_training_section

TOP_LEVEL_KEYS = ("optimizer", "continual_strategy", "training", "output_dir", "num_epochs", "batch_size", "seed")
OPTIMIZER_KEYS = ("type", "lr", "weight_decay", "betas", "eps", "momentum")
# Adam is AdamW with no weight decay; the HF Trainer names its optimizers differently.
OPTIMIZERS = {"adam": "adamw_torch", "adamw": "adamw_torch", "sgd": "sgd", "adafactor": "adafactor"}
# The options each type uses besides type/lr/weight_decay. The HF Trainer passes `betas`/`eps`
# (adam_beta1/2, adam_epsilon) to its AdamW optimizers only and `momentum` (optim_args) to SGD only;
# anything else would be dropped without a word, so it is refused instead.
TYPE_OPTIONS = {"adam": ("betas", "eps"), "adamw": ("betas", "eps"), "sgd": ("momentum",), "adafactor": ()}


def _check_keys(section: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    if not isinstance(section, dict):
        raise TypeError(f"config section {where} must be a dict, got {type(section).__name__}.")
    for key in section:
        if key not in valid:
            raise RecipeError(_unknown_message(f"config key '{key}'", where, key, list(valid)))


def _optimizer_family(optim: str) -> str | None:
    """The ``TYPE_OPTIONS`` key of a ``TrainingArguments.optim`` name, or ``None`` for another optimizer."""
    optim = optim.lower()
    if optim.startswith(("adamw", "paged_adamw")):
        return "adamw"
    return optim if optim in ("sgd", "adafactor") else None


def _check_type_options(optimizer: dict[str, Any], optim: str | None, args_class: type) -> None:
    """Raise when ``optimizer`` holds an option that its optimizer type would ignore."""
    given = [key for key in optimizer if key not in ("type", "lr", "weight_decay")]
    if not given:
        return
    if "type" in optimizer:
        kind, source = str(optimizer["type"]).lower(), f"type '{str(optimizer['type']).lower()}'"
    else:
        # No type: the optimizer is config['training']['optim'], else the arguments class's default.
        if optim is None:
            optim = str(getattr(args_class, "optim", None) or "adamw_torch")
        optim = str(getattr(optim, "value", optim))
        kind, source = _optimizer_family(optim), f"optim '{optim}' (no config['optimizer']['type'] given)"
    allowed = TYPE_OPTIONS.get(kind, ()) if kind is not None else ()
    for key in given:
        if key not in allowed:
            users = [name for name, options in TYPE_OPTIONS.items() if key in options]
            raise RecipeError(
                f"config['optimizer']['{key}'] applies to type {' or '.join(repr(u) for u in users)} only, got {source}, "
                f"whose optimizer would ignore it. Remove '{key}' or set config['optimizer']['type'] to "
                f"{' or '.join(repr(u) for u in users)}."
            )


def parse_config_dict(config: dict[str, Any], args_class: type | None = None) -> tuple[dict[str, Any], list[Strategy]]:
    """Turn a config dict into ``TrainingArguments`` keyword arguments and strategy objects.

    Args:
        config (`dict`): Keys ``optimizer`` ({type, lr, weight_decay, betas, eps, momentum}; ``betas`` and
            ``eps`` apply to types adam/adamw, ``momentum`` to sgd, and one the type would ignore raises),
            ``continual_strategy`` ({strategy name: {enabled, options...}}), ``training`` (any
            ``TrainingArguments`` field), ``output_dir``, ``num_epochs``, ``batch_size``, ``seed``.
            Numbers may be written as strings that parse ("1e-3"); booleans must be real booleans or
            exactly "true"/"false".
        args_class (`type`, *optional*): The arguments class the keywords are for (defaults to
            ``ContinualTrainingArguments``); every keyword is checked against its fields.

    Returns:
        `(dict, list[Strategy])`: keyword arguments for the arguments class, and the enabled
        strategies in the order they appear.
    """
    _check_keys(config, TOP_LEVEL_KEYS, "config")
    if args_class is None:
        from .args import ContinualTrainingArguments as args_class
    # Names and types of every training keyword, before any model or data is touched.
    kwargs: dict[str, Any] = validate_training_section(config.get("training", {}), args_class, where="config['training']")
    optimizer = config.get("optimizer", {})
    # An unknown key names the type too, since which options apply depends on it.
    kind_named = f" (type '{optimizer['type']}')" if isinstance(optimizer, dict) and "type" in optimizer else ""
    _check_keys(optimizer, OPTIMIZER_KEYS, f"config['optimizer']{kind_named}")
    if "type" in optimizer:
        kind = str(optimizer["type"]).lower()
        if kind not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer type '{kind}'.{did_you_mean(kind, OPTIMIZERS)} Valid: {', '.join(OPTIMIZERS)}.")
        kwargs["optim"] = OPTIMIZERS[kind]
        if kind == "adam":
            kwargs.setdefault("weight_decay", 0.0)
    _check_type_options(optimizer, kwargs.get("optim"), args_class)
    if "lr" in optimizer:
        kwargs["learning_rate"] = as_number(optimizer["lr"], "config['optimizer']['lr']")
    if "weight_decay" in optimizer:
        kwargs["weight_decay"] = as_number(optimizer["weight_decay"], "config['optimizer']['weight_decay']")
    if "betas" in optimizer:
        betas = optimizer["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"config['optimizer']['betas'] must be a pair of numbers, got {betas!r}.")
        kwargs["adam_beta1"], kwargs["adam_beta2"] = (as_number(b, "config['optimizer']['betas']") for b in betas)
    if "eps" in optimizer:
        kwargs["adam_epsilon"] = as_number(optimizer["eps"], "config['optimizer']['eps']")
    if "momentum" in optimizer:
        momentum = as_number(optimizer["momentum"], "config['optimizer']['momentum']")
        kwargs["optim_args"] = f"momentum={momentum}"
    if "output_dir" in config:
        kwargs["output_dir"] = config["output_dir"]
    if "num_epochs" in config:  # 0 epochs would train nothing, then save the task as trained
        kwargs["num_train_epochs"] = as_number(config["num_epochs"], "config['num_epochs']", low=0, low_inclusive=False)
    if "batch_size" in config:
        kwargs["per_device_train_batch_size"] = as_number(config["batch_size"], "config['batch_size']", int, low=1)
    if "seed" in config:
        kwargs["seed"] = as_number(config["seed"], "config['seed']", int)

    strategies: list[Strategy] = []
    section = config.get("continual_strategy", {})
    if not isinstance(section, dict):
        raise TypeError("config['continual_strategy'] must be a dict of {strategy name: options}.")
    for name, options in section.items():
        options = dict(options or {})
        if not as_bool(options.pop("enabled", True), f"config['continual_strategy']['{name}']['enabled']"):
            continue
        strategies.append(build_strategy(name, **options))
    return kwargs, strategies
