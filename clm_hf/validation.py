"""Strict checks of user input (recipes, config dicts, datasets, checkpoints) before any training.

YAML and config dicts hand over whatever was written: ``"false"`` is a true value for ``bool()``,
``"8"`` is not an int and ``{num_epochs: 2}`` is no ``TrainingArguments`` field. These helpers
turn such input into the right type or raise a :class:`RecipeError` that names the key, the
expected type or range and what was given, before a model or a dataset is loaded.

>>> as_bool("false", "model.trust_remote_code")
False
>>> as_number("1e-3", "training.learning_rate")
0.001
>>> as_number("fast", "training.learning_rate")
Traceback (most recent call last):
...
clm_hf.validation.RecipeError: training.learning_rate must be a number (float), got str 'fast'.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "RecipeError",
    "as_bool",
    "as_number",
    "check_checkpoint_matches_model",
    "check_keys",
    "check_primary_metric",
    "check_row_lengths",
    "check_tensor_columns",
    "check_training_length",
    "did_you_mean",
    "validate_model_section",
    "validate_strategies_section",
    "validate_training_section",
]


class RecipeError(ValueError):
    """A recipe, config dict or argument has a wrong key, type or value; the message names it."""


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def as_bool(value: Any, key: str) -> bool:
    """A real boolean, or one of the exact strings ``"true"``/``"false"``; anything else is an error.

    ``bool("false")`` is ``True``, so a quoted YAML boolean must not go through ``bool()``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise RecipeError(f"{key} must be a boolean (true or false), got {_shown(value)}.")


def as_number(value: Any, key: str, kind: type = float, *, low: float | None = None,
              low_inclusive: bool = True) -> float | int:
    """``value`` as a ``kind`` (``float`` or ``int``); strings are converted when they parse.

    Args:
        value: What was written (a number, or a string such as ``"1e-3"`` from a quoted YAML value).
        key (`str`): How to name it in the message, e.g. ``"training.learning_rate"``.
        kind (`type`): ``float`` or ``int``. An int field accepts integral floats (``2.0``).
        low (`float`, *optional*): Smallest allowed value.
        low_inclusive (`bool`): Whether ``low`` itself is allowed.
    """
    label = "a number (float)" if kind is float else "an integer (int)"
    number: Any = value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecipeError(f"{key} must be {label}, got {_shown(value)}.")
    if isinstance(value, str):
        try:
            number = float(value.strip()) if kind is float else _parse_int(value)
        except ValueError:
            raise RecipeError(f"{key} must be {label}, got {_shown(value)}.") from None
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise RecipeError(f"{key} must be {label}, got {_shown(value)}.")
        number = int(number)
    else:
        number = float(number)
    if low is not None and (number < low or (number == low and not low_inclusive)):
        raise RecipeError(f"{key} must be {'>=' if low_inclusive else '>'} {low:g}, got {value!r}.")
    return number


def _parse_int(text: str) -> int:
    number = float(text.strip())  # "8", "8.0" and "1e3" are integers written as text
    if not number.is_integer():
        raise ValueError(text)
    return int(number)


def did_you_mean(word: Any, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """A `` Did you mean 'x'?`` hint naming the closest of ``choices``, or ``""``.

    >>> did_you_mean("num_epochs", ["num_train_epochs", "seed"])
    " Did you mean 'num_train_epochs'?"
    """
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_keys(section: Any, valid: Iterable[str], where: str, listing: str | None = None) -> None:
    """Refuse a non-mapping ``section`` or a key not in ``valid``, suggesting the closest valid key.

    ``listing`` replaces the list of valid keys in the message when there are too many to show.
    """
    valid = list(valid)
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a mapping of keys to values, got {_shown(section)}.")
    for key in section:
        if key not in valid:
            hint = did_you_mean(key, valid)
            shown = ", ".join(sorted(valid)) if len(valid) <= 20 or listing is None else listing
            raise RecipeError(f"Unknown key '{key}' in {where}.{hint} Valid keys: {shown}.")


# --- TrainingArguments --------------------------------------------------------------------------------
def _simple_types(hint: Any) -> set[Any]:
    """The plain types a (possibly ``Optional``/union) annotation allows."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_simple_types(a) for a in typing.get_args(hint)))
    if origin is not None:
        return {origin}
    if hint is typing.Any:
        return {object}
    return {hint}


def validate_training_section(section: Any, args_class: type, where: str = "training") -> dict[str, Any]:
    """Check the ``training`` section of a recipe against the fields of ``args_class``.

    Unknown keys get a "Did you mean" suggestion, booleans must be real booleans or exact
    ``"true"``/``"false"``, and int/float fields accept numbers written as strings when they parse.
    ``num_train_epochs`` must be > 0 unless ``max_steps`` sets the length.

    Returns:
        `dict`: The section with values converted to their field types.
    """
    if section is None:
        return {}
    fields = {f.name: f for f in dataclasses.fields(args_class) if f.init}
    check_keys(section, fields, where, listing=f"the fields of {args_class.__name__}")
    hints = typing.get_type_hints(args_class)
    out = dict(section)
    for key, value in section.items():
        allowed = _simple_types(hints.get(key, object))
        name = f"{where}.{key}"
        if value is None or object in allowed:
            continue
        if bool in allowed and (isinstance(value, bool) or str not in allowed):
            out[key] = as_bool(value, name)
        elif int in allowed and str not in allowed and float not in allowed:
            out[key] = as_number(value, name, int)
        elif float in allowed and str not in allowed:
            out[key] = as_number(value, name, float)
    check_training_length(out.get("num_train_epochs"), out.get("max_steps"), f"{where}.")
    if "primary_metric" in out and "eval_metrics" in fields:
        metrics = out.get("eval_metrics") or fields["eval_metrics"].default_factory()
        check_primary_metric(out["primary_metric"], metrics, where)
    return out


def check_primary_metric(primary_metric: Any, computed: Iterable[str], where: str = "args") -> None:
    """The primary metric must be one the run computes, else the summary fails after the first task."""
    computed = list(computed)
    if primary_metric not in computed:
        hint = did_you_mean(primary_metric, computed)
        raise RecipeError(
            f"{where}.primary_metric is {primary_metric!r}, which this run does not compute.{hint} It computes "
            f"{computed} (eval_metrics plus the trainer's task_metrics)."
        )


def check_training_length(num_train_epochs: Any, max_steps: Any = None, where: str = "training.",
                          name: str = "num_train_epochs") -> None:
    """``num_train_epochs <= 0`` (without ``max_steps``) trains nothing yet saves checkpoints as if trained."""
    if num_train_epochs is None or (isinstance(max_steps, int) and max_steps > 0):
        return
    if isinstance(num_train_epochs, (int, float)) and not isinstance(num_train_epochs, bool) and num_train_epochs <= 0:
        raise RecipeError(
            f"{where}{name} must be > 0, got {num_train_epochs!r}: the task would train 0 steps and then be "
            "saved and scored as if trained. Set max_steps > 0 instead for a fixed number of steps."
        )


# --- model and strategies sections --------------------------------------------------------------------
_TINY_MODEL_OPTIONS = ("arch", "hidden_size", "num_layers", "num_heads", "seed")
_PRETRAINED_BOOLS = ("trust_remote_code", "low_cpu_mem_usage", "local_files_only", "use_safetensors")


def _config_class(arch: str) -> type | None:
    import transformers

    return {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
            "t5": transformers.T5Config}.get(arch)


def validate_model_section(section: Any, where: str = "model") -> dict[str, Any]:
    """Check a recipe's ``model`` section; return it with converted values.

    A tiny model (``arch``) takes ``hidden_size``, ``num_layers``, ``num_heads``, ``seed`` and any
    attribute of the architecture's config class; a typo such as ``hiden_size`` is an error. A
    pretrained model (``name_or_path``) gets its boolean options checked.
    """
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a mapping (arch: gpt2, or name_or_path: ...), got {_shown(section)}.")
    out = dict(section)
    if "name_or_path" in section:
        for key in _PRETRAINED_BOOLS:
            if key in out:
                out[key] = as_bool(out[key], f"{where}.{key}")
        return out
    arch = section.get("arch", "gpt2")
    config_class = _config_class(arch) if isinstance(arch, str) else None
    if config_class is None:
        return out  # build_tiny_model names the supported architectures
    defaults = config_class().to_dict()
    valid = list(dict.fromkeys([*_TINY_MODEL_OPTIONS, *defaults, *getattr(config_class, "attribute_map", {})]))
    check_keys(section, valid, where, listing=f"{', '.join(_TINY_MODEL_OPTIONS)} and the attributes of "
                                              f"{config_class.__name__} (a tiny {arch} model)")
    for key in ("hidden_size", "num_layers", "num_heads", "seed"):
        if key in out:
            out[key] = as_number(out[key], f"{where}.{key}", int)
    for key, value in section.items():
        default = defaults.get(key)
        if key in _TINY_MODEL_OPTIONS or default is None or value is None:
            continue
        if isinstance(default, bool):
            out[key] = as_bool(value, f"{where}.{key}")
        elif isinstance(default, float):
            out[key] = as_number(value, f"{where}.{key}", float)
        elif isinstance(default, int):
            out[key] = as_number(value, f"{where}.{key}", int)
    return out


def validate_strategies_section(section: Any, where: str = "strategies") -> list[Any]:
    """The ``strategies`` section as a list of specs.

    Accepted: a list (``- {name: ewc, ewc_lambda: 100}`` or ``- replay``), one name, one mapping
    with a ``name`` key, or a mapping ``{strategy name: options}`` (``{ewc: {ewc_lambda: 100}}``).
    """
    if section is None:
        return []
    if isinstance(section, str):
        return [section]
    if isinstance(section, list):
        return section
    if isinstance(section, dict):
        if "name" in section:
            return [section]
        specs = []
        for name, options in section.items():
            if options is not None and not isinstance(options, dict):
                raise RecipeError(
                    f"{where}.{name} must be a mapping of options (or empty), got {_shown(options)}. Write strategies "
                    "as a list, e.g. 'strategies: [{name: ewc, ewc_lambda: 100}]'."
                )
            specs.append({"name": name, **(options or {})})
        return specs
    raise RecipeError(f"{where} must be a list such as [{{name: ewc, ewc_lambda: 100}}], got {_shown(section)}.")


# --- datasets ------------------------------------------------------------------------------------------
def check_row_lengths(dataset: Any, max_positions: int | None, what: str) -> None:
    """Refuse rows with more tokens than the model has positions (an ``IndexError`` deep in torch otherwise)."""
    if not max_positions or "input_ids" not in dataset.column_names or len(dataset) == 0:
        return
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")[:].column("input_ids"))
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > max_positions:
        row = pc.index(lengths, longest).as_py()
        count = pc.sum(pc.greater(lengths, max_positions)).as_py()
        raise ValueError(
            f"Row {row} of the {what} has {longest} tokens, but the model has only {max_positions} positions "
            f"(max_position_embeddings); {count} row(s) are too long. Truncate or drop them (e.g. "
            f"dataset.filter(lambda r: len(r['input_ids']) <= {max_positions}))."
        )


def check_tensor_columns(dataset: Any, what: str, keep: Iterable[str] = ()) -> None:
    """Refuse text columns that would reach the collator (``remove_unused_columns=False``)."""
    import pyarrow as pa

    keep = set(keep)
    schema = dataset.features.arrow_schema
    for column in dataset.column_names:
        kind = schema.field(column).type
        while pa.types.is_list(kind) or pa.types.is_large_list(kind):
            kind = kind.value_type
        if column not in keep and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(
                f"The {what} has a text column '{column}', which cannot become a tensor: with "
                "remove_unused_columns=False every column reaches the model. Drop it first "
                f"(dataset.remove_columns(['{column}'])) or keep remove_unused_columns=True."
            )


# --- checkpoints ---------------------------------------------------------------------------------------
def _checkpoint_shapes(directory: Path) -> dict[str, list[int]] | None:
    """Parameter name -> shape of the safetensors weights in a Trainer checkpoint, read from the headers."""
    from safetensors import safe_open

    files = [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    if not all(f.is_file() for f in files):
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


def check_checkpoint_matches_model(model: Any, checkpoint: str | Path) -> None:
    """Refuse resuming a Trainer checkpoint written by a model of another shape, naming the parameter.

    Otherwise the model loads partially (``strict=False``) and the optimizer fails with "parameter
    group that doesn't match".
    """
    shapes = _checkpoint_shapes(Path(checkpoint))
    if shapes is None:
        return
    state = model.state_dict()
    for name, shape in shapes.items():
        if name not in state:
            raise ValueError(
                f"The checkpoint {checkpoint} has parameter '{name}' {tuple(shape)}, which this model does not have: "
                "it was written by a model of another shape. Resume with the model the run was started with."
            )
        if list(state[name].shape) != shape:
            raise ValueError(
                f"The checkpoint {checkpoint} has parameter '{name}' of shape {tuple(shape)}, but this model's is "
                f"{tuple(state[name].shape)}: it was written by a model of another shape. Resume with the model the "
                "run was started with."
            )
    saved = {state[n].data_ptr() for n in shapes}
    for name, tensor in state.items():
        if name not in shapes and tensor.data_ptr() not in saved:  # tied weights are saved once
            raise ValueError(
                f"This model has parameter '{name}' {tuple(tensor.shape)}, which the checkpoint {checkpoint} lacks: it "
                "was written by a model of another shape. Resume with the model the run was started with."
            )
