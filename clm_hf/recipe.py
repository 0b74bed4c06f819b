"""YAML recipes: one file says which model, which task stream, which strategies, which arguments.

A recipe is a dict with four main sections::

    model:                       # a tiny model built on the spot ...
      arch: gpt2                 #   gpt2 | llama | t5, plus any build_tiny_model option
    # ... or a pretrained one:   name_or_path: ./my-model (local folder or Hub id), tokenizer: ...
    #   lora: {r: 16, target_modules: [q_proj, v_proj]}   # optional: train LoRA adapters (peft.LoraConfig fields)
    tasks:                       # the built-in synthetic suite ...
      suite: synthetic
      names: [copy, shift, rotate]
      num_train: 512
    # ... or a list of {name, train, eval} where train/eval are load_dataset() arguments,
    # e.g. {path: json, data_files: data/reverse.jsonl} with text, prompt/completion, messages or
    # input_ids columns; text_column, prompt_column, completion_column, messages_column (in the task or
    # in a split) rename the user's columns, e.g. prompt_column: question.
    strategies:
      - {name: replay, buffer_size: 200}
      - {name: ewc, ewc_lambda: 1000}
    training:                    # any ContinualTrainingArguments field
      output_dir: runs/ewc
      num_train_epochs: 4
    reference:                   # optional: eval sets scored after every task, never trained
      general: {path: json, data_files: data/general.jsonl}   # load_dataset() arguments ...
      held_out: {synthetic: rotate, num_rows: 64}             # ... or a synthetic task
    trainer: sft                 # optional: clm_hf.sft.ContinualSFTTrainer (TRL); `training` is then a
                                 # ContinualSFTConfig (packing, completion_only_loss, ...). Default: continual

Command-line overrides use dotted keys, TRL style: ``--training.learning_rate 1e-3``,
``--strategies.1.ewc_lambda 50``. Values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .validation import (
    RecipeError,
    as_bool,
    did_you_mean,
    validate_model_section,
    validate_strategies_section,
    validate_training_section,
)

if TYPE_CHECKING:  # pragma: no cover
    from .results import ContinualResults
    from .trainer import ContinualTrainerMixin

logger = logging.getLogger(__name__)

SECTIONS = ("model", "tasks", "strategies", "training", "reference", "trainer")
# `trainer:` values: the Trainer subclass a recipe builds ("continual": ContinualCausalLMTrainer or
# ContinualSeq2SeqTrainer, as the model needs; "sft": clm_hf.sft.ContinualSFTTrainer over trl.SFTTrainer).
TRAINERS = ("continual", "sft")


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads ``1e-4`` as a float (YAML 1.2), not as the string "1e-4".

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-4``); a learning rate written the
    usual way would otherwise reach the optimizer as a string.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    loader = _RecipeLoader(text)  # what yaml.safe_load does, with the resolver above
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML recipe and apply ``--dotted.key value`` overrides.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.yaml")
    >>> _ = open(path, "w").write("model: {arch: gpt2}\\ntraining: {learning_rate: 0.001}\\n")
    >>> load_recipe(path, ["--training.learning_rate", "0.01"])["training"]["learning_rate"]
    0.01
    >>> load_recipe(path, ["--training.learning_rate", "3e-4"])["training"]["learning_rate"]
    0.0003
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe file {path} does not exist.")
    recipe = _load_yaml(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a YAML mapping with sections {list(SECTIONS)}.")
    return apply_overrides(recipe, overrides or [])


def validate_recipe(recipe: dict[str, Any]) -> None:
    for key in recipe:
        if key not in SECTIONS:
            raise ValueError(f"Unknown recipe section '{key}'.{did_you_mean(key, SECTIONS)} Valid sections: {', '.join(SECTIONS)}.")
    if "model" not in recipe:
        raise ValueError("A recipe needs a 'model' section (arch: gpt2, or name_or_path: ...).")
    if "tasks" not in recipe:
        raise ValueError("A recipe needs a 'tasks' section (suite: synthetic, or a list of tasks).")
    trainer_kind(recipe)


def trainer_kind(recipe: dict[str, Any]) -> str:
    """The recipe's ``trainer`` value (``"continual"`` when absent), checked against :data:`TRAINERS`.

    >>> trainer_kind({"trainer": "sft"}), trainer_kind({})
    ('sft', 'continual')
    """
    kind = recipe.get("trainer", "continual")
    if kind not in TRAINERS:
        raise RecipeError(f"trainer must be one of {', '.join(TRAINERS)}, got {type(kind).__name__} {kind!r}."
                          f"{did_you_mean(kind, TRAINERS)}")
    return kind


def _sft_classes() -> tuple[type, type]:
    """``(ContinualSFTConfig, ContinualSFTTrainer)``, or a one-line error naming the extra when TRL is missing."""
    try:
        from .sft import ContinualSFTConfig, ContinualSFTTrainer
    except ImportError as err:
        raise RecipeError(f"The recipe says 'trainer: sft', which needs TRL: pip install 'clm-hf[trl]' ({err}).") from None
    return ContinualSFTConfig, ContinualSFTTrainer


def lora_config(section: Any, seq2seq: bool = False, where: str = "model.lora") -> Any:
    """A ``peft.LoraConfig`` from a recipe's ``model.lora`` mapping (its keys are ``LoraConfig`` fields).

    ``task_type`` defaults to the model's (``CAUSAL_LM`` or ``SEQ_2_SEQ_LM``).

    Args:
        section (`dict`): E.g. ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}``.
        seq2seq (`bool`, *optional*): The model is an encoder-decoder.
        where (`str`, *optional*): How to name the section in errors.

    Returns:
        `peft.LoraConfig`

    >>> lora_config({"r": 4, "target_modules": ["q_proj"]}).r
    4
    """
    import dataclasses

    from peft import LoraConfig

    from .validation import check_keys

    fields = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    check_keys(section, fields, where, listing="the fields of peft.LoraConfig")
    options = dict(section)
    options.setdefault("task_type", "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    try:
        return LoraConfig(**options)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``["--a.b", "value", ...]`` (or ``--a.b=value``) to a copy of ``recipe``."""
    recipe = copy.deepcopy(recipe)
    pairs: list[tuple[str, str]] = []
    items = list(overrides)
    while items:
        token = items.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"Expected an override like --training.learning_rate 1e-3, got '{token}'.")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if not items:
                raise ValueError(f"Override --{key} has no value.")
            value = items.pop(0)
        pairs.append((key, value))
    for key, raw in pairs:
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise ValueError(f"Override --{key}: unknown section '{parts[0]}'; use one of {', '.join(SECTIONS)}.")
        node: Any = recipe
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                node = node[_index(part, node, key)]
            else:
                node = node.setdefault(part, [] if nxt.isdigit() else {})
        last = parts[-1]
        value = _load_yaml(raw)
        if isinstance(node, list):
            node[_index(last, node, key)] = value
        else:
            node[last] = value
    return recipe


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"Override --{key}: '{part}' is not an index of a list of {len(node)} entries.")
    return int(part)


def build_model_and_tokenizer(section: dict[str, Any]) -> tuple[Any, Any]:
    """A tiny model built on the spot (``arch``) or a pretrained one (``name_or_path``)."""
    section = dict(section)
    if "name_or_path" in section:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path = section.pop("name_or_path")
        tokenizer_path = section.pop("tokenizer", path)
        trust = as_bool(section.pop("trust_remote_code", False), "model.trust_remote_code")
        dtype = section.pop("dtype", "auto")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(path, trust_remote_code=trust, dtype=dtype, **section)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    from .tasks import build_tiny_model, build_tokenizer

    arch = section.pop("arch", "gpt2")
    tokenizer = build_tokenizer()
    return build_tiny_model(arch, tokenizer, **section), tokenizer


def model_is_seq2seq(section: dict[str, Any]) -> bool:
    """Whether a recipe's model section names an encoder-decoder model, read from its config alone.

    The training arguments' class depends on it, and they are built before the model (see ``run_recipe``).

    Args:
        section (`dict`): The recipe's ``model`` section, validated.

    Returns:
        `bool`: True for an encoder-decoder model (``arch: t5``, or a pretrained config with ``is_encoder_decoder``).

    Example:

    ```python
    >>> model_is_seq2seq({"arch": "t5"}), model_is_seq2seq({"arch": "gpt2"})
    (True, False)

    ```
    """
    if "name_or_path" not in section:
        return section.get("arch", "gpt2") == "t5"
    from transformers import AutoConfig

    trust = as_bool(section.get("trust_remote_code", False), "model.trust_remote_code")
    extra = {"revision": section["revision"]} if "revision" in section else {}
    config = AutoConfig.from_pretrained(section["name_or_path"], trust_remote_code=trust, **extra)
    return bool(getattr(config, "is_encoder_decoder", False))


def build_task_stream(section: Any) -> dict[str, dict[str, Any]]:
    """The task stream of a recipe, as ``{name: {"train": Dataset, "eval": Dataset | None}}``."""
    if isinstance(section, dict):
        section = dict(section)
        suite = section.pop("suite", "synthetic")
        if suite != "synthetic":
            raise ValueError(f"Unknown task suite '{suite}'; the built-in suite is 'synthetic'.")
        from .tasks import make_suite

        return {name: {"train": d["train"], "eval": d["eval"]} for name, d in make_suite(section.pop("names", None), **section).items()}
    if not isinstance(section, list) or not section:
        raise ValueError("'tasks' must be {suite: synthetic, ...} or a non-empty list of {name, train, eval}.")
    from datasets import load_dataset

    names = []
    for i, entry in enumerate(section):
        if isinstance(entry, dict) and entry.get("eval") is not None:
            _check_eval_split(entry, i)
        if not isinstance(entry, dict) or "train" not in entry:
            raise ValueError(f"Task {i} of the recipe needs a 'train' entry (load_dataset arguments).")
        name = str(entry.get("name", f"task_{i}"))
        if name in names:
            raise ValueError(f"Task name '{name}' appears twice in the recipe; names must be unique.")
        names.append(name)
    from .layouts import COLUMN_OPTIONS, rename_columns

    stream: dict[str, dict[str, Any]] = {}
    for name, entry in zip(names, section):
        splits = {}
        # Column names map for the whole task, or per split; they are never load_dataset() arguments.
        task_columns = {k: entry[k] for k in COLUMN_OPTIONS if k in entry}
        for split in ("train", "eval"):
            if entry.get(split) is not None:
                if not isinstance(entry[split], dict):
                    raise RecipeError(f"tasks '{name}'.{split} must be a mapping of load_dataset() arguments, "
                                      f"got {type(entry[split]).__name__} {entry[split]!r}.")
                kwargs = dict(entry[split])
                columns = {**task_columns, **{k: kwargs.pop(k) for k in COLUMN_OPTIONS if k in kwargs}}
                kwargs.setdefault("split", "train")
                splits[split] = rename_columns(load_dataset(**kwargs), columns, what=f"{split} dataset of task '{name}'")
        stream[name] = {"train": splits["train"], "eval": splits.get("eval")}
    return stream


def build_reference_sets(section: Any) -> dict[str, Any]:
    """The reference sets of a recipe (scored, never trained), as ``{name: Dataset}``.

    Each entry is either ``load_dataset()`` arguments (``split`` defaults to "train", the only split
    of a local file) with ``text``, ``prompt``/``answer`` (or ``completion``), ``messages`` or
    ``input_ids``/``labels`` rows, or ``{synthetic: <task>, num_rows: N, seed: S}`` for a task of the
    built-in suite. ``text_column``, ``prompt_column``, ``completion_column`` and ``messages_column``
    rename the set's columns, as in a task.

    >>> sets = build_reference_sets({"held_out": {"synthetic": "rotate", "num_rows": 4}})
    >>> sets["held_out"].column_names
    ['prompt', 'answer']
    """
    if section is None:
        return {}
    if not isinstance(section, dict) or not section:
        raise RecipeError("'reference' must be a mapping name -> {load_dataset arguments} or {synthetic: <task>}.")
    sets: dict[str, Any] = {}
    for name, entry in section.items():
        if not isinstance(entry, dict):
            raise RecipeError(f"reference.{name} must be a mapping (load_dataset arguments or {{synthetic: <task>}}), "
                              f"got {type(entry).__name__}.")
        entry = dict(entry)
        if "synthetic" in entry:
            from .tasks import make_task

            unknown = sorted(set(entry) - {"synthetic", "num_rows", "seed", "min_len", "max_len"})
            if unknown:
                raise RecipeError(f"Unknown key(s) {unknown} in reference.{name}; a synthetic reference set takes "
                                  "synthetic, num_rows, seed, min_len, max_len.")
            sets[str(name)] = make_task(entry.pop("synthetic"), entry.pop("num_rows", 64), **entry)
            continue
        if "path" not in entry:
            raise RecipeError(f"reference.{name} needs 'path' (load_dataset arguments) or 'synthetic' (a built-in task).")
        from datasets import load_dataset

        from .layouts import COLUMN_OPTIONS, rename_columns

        columns = {k: entry.pop(k) for k in COLUMN_OPTIONS if k in entry}  # never load_dataset() arguments
        entry.setdefault("split", "train")
        sets[str(name)] = rename_columns(load_dataset(**entry), columns, what=f"reference set '{name}'")
    return sets


def _check_eval_split(entry: dict[str, Any], index: int) -> None:
    """Refuse an eval entry that would silently score the training rows; log the split otherwise.

    ``load_dataset`` without ``split`` defaults here to "train": right for a local file of eval rows
    (its only split), wrong for a Hub dataset or for the training files themselves.
    """
    train, evaluation = dict(entry.get("train") or {}), dict(entry["eval"])
    where = f"tasks[{index}] ('{entry.get('name', f'task_{index}')}')"
    same_source = {k: v for k, v in train.items() if k != "split"} == {k: v for k, v in evaluation.items() if k != "split"}
    if same_source and evaluation.get("split", "train") == train.get("split", "train"):
        raise RecipeError(
            f"{where}: eval loads the same rows as train (split '{evaluation.get('split', 'train')}' of the same "
            "dataset), so the scores would be on the training rows. Name a held-out split (e.g. split: test) or "
            "give eval its own data_files."
        )
    if "split" in evaluation:
        return
    if evaluation.get("data_files") is None:
        raise RecipeError(
            f"{where}: the eval entry names no split, so split 'train' of {evaluation.get('path')!r} (its training "
            "rows) would be scored. Name a held-out split, e.g. 'eval: {path: ..., split: validation}' (or split: test)."
        )
    logger.info("clm-hf: task %s is scored on split 'train' of its eval data_files %s", where, evaluation["data_files"])


def _build_strategies(specs: list[Any]) -> list[Any]:
    """Build each strategy entry; a wrong option is a `RecipeError` naming it, e.g. ``strategies[0].buffer_size``."""
    from .strategies.base import strategies_from_specs

    built: list[Any] = []
    for index, spec in enumerate(specs):
        try:
            built += strategies_from_specs([spec])
        except (TypeError, ValueError) as err:
            message = str(err)
            options = [k for k in spec if k != "name"] if isinstance(spec, dict) else []
            key = next((k for k in options if re.search(rf"(?<![\w.]){re.escape(str(k))}(?!\w)", message)), None)
            if isinstance(err, TypeError) and key is None:
                raise  # not about an option of the recipe's: a bug, which keeps its traceback
            raise RecipeError(f"strategies[{index}]{'.' + str(key) if key else ''}: {message}") from err
    return built


def run_recipe(recipe: dict[str, Any], *, resume: str | bool | None = None, output_dir: str | None = None,
               joint: bool = False, force_resume: bool = False,
               restart_on_damage: bool = False) -> tuple[ContinualResults, ContinualTrainerMixin]:
    """Build everything a recipe describes and train the stream; returns ``(results, trainer)``.

    ``joint=True`` trains all tasks at once instead (the multitask upper bound); ``force_resume``
    resumes even though strategy settings changed, and ``restart_on_damage`` starts the stream
    again when every checkpoint is damaged (see ``ContinualTrainer.fit``).
    """
    from .args import ContinualSeq2SeqTrainingArguments, ContinualTrainingArguments
    from .trainer import ContinualCausalLMTrainer, ContinualSeq2SeqTrainer

    validate_recipe(recipe)
    kind = trainer_kind(recipe)
    # Every section is checked before the model or any data is loaded.
    model_entry, lora = recipe["model"], None
    if isinstance(model_entry, dict) and "lora" in model_entry:
        model_entry = dict(model_entry)
        lora = model_entry.pop("lora")  # not a from_pretrained() argument: the adapters wrap the loaded model
        lora_config(lora)  # a wrong key fails now, not after the model is loaded
    model_section = validate_model_section(model_entry)
    seq2seq_arch = model_section.get("arch") == "t5" or "name_or_path" in model_section
    if kind == "sft":
        sft_config_class, sft_trainer_class = _sft_classes()
        training = validate_training_section(recipe.get("training"), sft_config_class)
    else:
        training = validate_training_section(
            recipe.get("training"), ContinualSeq2SeqTrainingArguments if seq2seq_arch else ContinualTrainingArguments)
    strategies = _build_strategies(validate_strategies_section(recipe.get("strategies")))
    stream = build_task_stream(recipe["tasks"])  # before the model: it checks the eval splits
    reference_sets = build_reference_sets(recipe.get("reference"))
    if output_dir is not None:
        training["output_dir"] = output_dir
    training.setdefault("output_dir", "runs/clm_hf")
    seq2seq = model_is_seq2seq(model_section)
    if kind == "sft" and seq2seq:
        raise RecipeError(f"trainer: sft builds TRL's SFTTrainer, which trains causal LMs; the model "
                          f"({model_section.get('name_or_path') or model_section.get('arch')}) is an encoder-decoder. "
                          "Remove 'trainer: sft'.")
    # Arguments before the model, the order transformers expects: TrainingArguments starts the process
    # group and registers DeepSpeed's ZeRO-3 config (zero3_init_flag) and FSDP's cpu_ram_efficient_loading,
    # which from_pretrained reads to build the model partitioned, or loaded on rank 0 only. Built the other
    # way round, every rank materialises the whole model first.
    if kind == "sft":
        args = sft_config_class(**training)
    else:
        args = (ContinualSeq2SeqTrainingArguments if seq2seq else ContinualTrainingArguments)(**training)
    model, tokenizer = build_model_and_tokenizer(model_section)
    if kind == "sft":
        # TRL wraps the model with peft_config itself (as SFTTrainer(peft_config=...) does in a script).
        peft = {"peft_config": lora_config(lora)} if lora is not None else {}
        trainer = sft_trainer_class(model=model, args=args, processing_class=tokenizer, strategies=strategies, **peft)
    else:
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(lora, seq2seq))
        trainer_class = ContinualSeq2SeqTrainer if seq2seq else ContinualCausalLMTrainer
        trainer = trainer_class(model=model, args=args, processing_class=tokenizer, strategies=strategies)
    if joint:
        for name, dataset in reference_sets.items():
            trainer.add_reference_set(name, dataset)
        return trainer.fit_joint(stream), trainer
    results = trainer.fit(stream, resume_from_checkpoint=resume, force_resume=force_resume,
                          restart_on_damage=restart_on_damage, reference_sets=reference_sets)
    return results, trainer
