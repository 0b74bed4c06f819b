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

import difflib
from typing import Any

from .strategies.base import Strategy, _unknown_message, build_strategy

TOP_LEVEL_KEYS = ("optimizer", "continual_strategy", "training", "output_dir", "num_epochs", "batch_size", "seed")
OPTIMIZER_KEYS = ("type", "lr", "weight_decay", "betas", "eps", "momentum")
# Adam is AdamW with no weight decay; the HF Trainer names its optimizers differently.
OPTIMIZERS = {"adam": "adamw_torch", "adamw": "adamw_torch", "sgd": "sgd", "adafactor": "adafactor"}


def _check_keys(section: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    if not isinstance(section, dict):
        raise TypeError(f"config section {where} must be a dict, got {type(section).__name__}.")
    for key in section:
        if key not in valid:
            raise ValueError(_unknown_message(f"config key '{key}'", where, key, list(valid)))


def parse_config_dict(config: dict[str, Any]) -> tuple[dict[str, Any], list[Strategy]]:
    """Turn a config dict into ``TrainingArguments`` keyword arguments and strategy objects.

    Args:
        config (`dict`): Keys ``optimizer`` ({type, lr, weight_decay, betas, eps, momentum}),
            ``continual_strategy`` ({strategy name: {enabled, options...}}), ``training`` (any
            ``TrainingArguments`` field), ``output_dir``, ``num_epochs``, ``batch_size``, ``seed``.

    Returns:
        `(dict, list[Strategy])`: keyword arguments for the arguments class, and the enabled
        strategies in the order they appear.
    """
    _check_keys(config, TOP_LEVEL_KEYS, "config")
    kwargs: dict[str, Any] = dict(config.get("training", {}))
    optimizer = config.get("optimizer", {})
    _check_keys(optimizer, OPTIMIZER_KEYS, "config['optimizer']")
    if "type" in optimizer:
        kind = str(optimizer["type"]).lower()
        if kind not in OPTIMIZERS:
            close = difflib.get_close_matches(kind, list(OPTIMIZERS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"Unknown optimizer type '{kind}'.{hint} Valid: {', '.join(OPTIMIZERS)}.")
        kwargs["optim"] = OPTIMIZERS[kind]
        if kind == "adam":
            kwargs.setdefault("weight_decay", 0.0)
    if "lr" in optimizer:
        kwargs["learning_rate"] = float(optimizer["lr"])
    if "weight_decay" in optimizer:
        kwargs["weight_decay"] = float(optimizer["weight_decay"])
    if "betas" in optimizer:
        kwargs["adam_beta1"], kwargs["adam_beta2"] = (float(b) for b in optimizer["betas"])
    if "eps" in optimizer:
        kwargs["adam_epsilon"] = float(optimizer["eps"])
    if "momentum" in optimizer:
        kwargs["optim_args"] = f"momentum={float(optimizer['momentum'])}"
    for key, target in (("output_dir", "output_dir"), ("num_epochs", "num_train_epochs"),
                        ("batch_size", "per_device_train_batch_size"), ("seed", "seed")):
        if key in config:
            kwargs[target] = config[key]

    strategies: list[Strategy] = []
    section = config.get("continual_strategy", {})
    if not isinstance(section, dict):
        raise TypeError("config['continual_strategy'] must be a dict of {strategy name: options}.")
    for name, options in section.items():
        options = dict(options or {})
        if not options.pop("enabled", True):
            continue
        strategies.append(build_strategy(name, **options))
    return kwargs, strategies
