"""The Hugging Face Hub: push a continual run so that someone else can continue the stream.

``trainer.push_to_hub()`` (and ``args.push_to_hub=True``) still goes through the Trainer's own
``push_to_hub``: it saves the model into a folder, writes a model card and uploads the folder with
``huggingface_hub``. clm-hf points that folder at ``<output_dir>/hub_repo`` and fills it first,
so the repository holds::

    README.md                  model card: tasks, strategies, score matrices, ACC/BWT/FWT/forgetting
    config.json, model.safetensors, generation_config.json, tokenizer files, training_args.bin
                               the model (or the PEFT adapters) as the Trainer saves it, ready for
                               AutoModelForCausalLM.from_pretrained(repo)
    continual_state/           the whole continual state (a clm-hf continual checkpoint: weights as
                               the strategies shaped them, strategy states, replay buffer, results,
                               RNG, manifest with sha256 of every file)
    base_model_config/         config of the underlying pretrained model, to rebuild it before the
                               continual weights load
    clm_hf_continual.json      trainer class, model class, tasks, strategies, training arguments (a
                               copy of continual_state/clm_hf_continual.json, which the manifest
                               covers and from_pretrained reads)
    plots/heatmap.png, plots/task_curves.png

:func:`from_pretrained` (``ContinualCausalLMTrainer.from_pretrained``) reads such a folder or
repository back, and also a local run folder or a continual checkpoint.

Secrets: the Hub token is never written. ``training_args.bin`` is saved with ``hub_token``
cleared (also when the Trainer pushes its own checkpoints, outside a task), and
``clm_hf_continual.json`` holds the arguments without any ``*_token`` field. No absolute local
path is published either: in ``clm_hf_continual.json`` and in the uploaded ``training_args.bin``,
an absolute path (``output_dir``) is reduced to its last component.
Mid-task checkpoints are not pushed (they would overwrite the repository's model with weights
that belong to no finished task); with ``args.push_to_hub=True`` and any ``hub_strategy`` but
``"end"``, the trainer pushes after every task instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import __version__
from . import state as ckpt
from .modeling import unwrap_model
from .state import CONTINUAL_DIR
from .strategies._lora import is_peft
from .strategies.base import STRATEGY_REGISTRY, Strategy, get_strategy_class, strategies_from_specs
from .tracking import _strategies_markdown, results_markdown, write_result_files

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_CONFIG_DIR",
    "HUB_FOLDER",
    "META_FILE",
    "STATE_DIR",
    "from_pretrained",
    "model_card",
    "push_to_hub",
    "save_continual_pretrained",
    "task_finished",
    "write_model_card",
    "write_run_base",
]

HUB_FOLDER = "hub_repo"
"""Sub-folder of ``output_dir`` that mirrors what is pushed."""
STATE_DIR = "continual_state"
BASE_CONFIG_DIR = "base_model_config"
META_FILE = "clm_hf_continual.json"
PLOTS_DIR = "plots"
META_FORMAT_VERSION = 1

# Files at the repository root that resuming does not need (the continual state has its own
# weights): not downloaded by from_pretrained.
_ROOT_WEIGHTS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json", "training_args.bin", "*.png"]


# --- writing ----------------------------------------------------------------------------------------
def _base_pretrained(model: Any) -> Any:
    """The pretrained model under PEFT / strategy wrappers (whose config rebuilds the model)."""
    from transformers import PreTrainedModel

    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"Cannot find a transformers PreTrainedModel inside {type(model).__name__} to save its config.")


def _save_base_config(base: Any, folder: Path) -> None:
    """The base model's config, and its generation config where it generates, into ``folder``."""
    base.config.save_pretrained(folder)
    generation = getattr(base, "generation_config", None)
    if generation is not None and getattr(base, "can_generate", lambda: False)():
        generation.save_pretrained(folder)


def _user_peft(trainer: Any) -> bool:
    """Whether the PEFT wrapping is the user's (to rebuild) rather than a strategy's (restore_model rebuilds it)."""
    if not is_peft(trainer.model):
        return False
    return not any(type(s).restore_model is not Strategy.restore_model for s in trainer.strategies)


def _public_value(key: str, value: Any) -> Any:
    """What a training argument may show in a published file: no token, no absolute local path."""
    if key.endswith("_token"):
        return None
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return Path(value).name  # e.g. output_dir: the run folder's name, not where it lies on this machine
    return value


def _safe_training_args(args: Any) -> dict[str, Any]:
    return {k: _public_value(k, v) for k, v in args.to_dict().items() if not k.endswith("_token")}


def write_public_training_args(args: Any, folder: str | os.PathLike) -> None:
    """Rewrite ``<folder>/training_args.bin`` (if there) from a copy of ``args`` without tokens or absolute paths.

    The Trainer pickles its arguments into every model folder it saves or uploads; in a folder that
    is published, that pickle must not tell where the run lay on the local disk.
    """
    import copy

    import torch
    from transformers.trainer import TRAINING_ARGS_NAME

    path = Path(folder) / TRAINING_ARGS_NAME
    if not path.is_file():
        return
    public = copy.copy(args)
    for key, value in vars(args).items():
        cleaned = _public_value(key, value)
        if cleaned is not value:
            setattr(public, key, cleaned)
    torch.save(public, path)


@contextlib.contextmanager
def public_uploads(args: Any, token: str | None) -> Iterator[None]:
    """Around the Trainer's own pushes: every folder it uploads gets public training args, and the token.

    ``Trainer.push_to_hub`` and ``Trainer._push_from_checkpoint`` save ``training_args.bin`` and then
    call ``hf_api().upload_folder``; this wraps that call so that the folder's ``training_args.bin``
    is rewritten by :func:`write_public_training_args` first, and so that the upload gets ``token``
    even while ``args.hub_token`` is hidden (else it would fall back to the stored login).
    """
    import transformers.trainer as hf_trainer

    original = getattr(hf_trainer, "hf_api", None)
    if original is None:  # another transformers layout: nothing to wrap
        yield
        return
    api = original()

    class _PublicApi:
        def __getattr__(self, name: str) -> Any:
            return getattr(api, name)

        def upload_folder(self, *a: Any, folder_path: Any = None, token: str | None = None, **kwargs: Any) -> Any:
            if folder_path is not None:
                write_public_training_args(args, folder_path)
            return api.upload_folder(*a, folder_path=folder_path, token=token if token is not None else secret,
                                     **kwargs)

    secret, proxy = token, _PublicApi()
    hf_trainer.hf_api = lambda: proxy
    try:
        yield
    finally:
        hf_trainer.hf_api = original


def _stage(trainer: Any, directory: Path, *, clean: bool) -> Path:
    """Fill ``directory`` with everything but the model files and the card (the Trainer writes those).

    ``clean`` empties the folder first (only for clm-hf's own ``hub_repo`` folder); otherwise only
    the entries written here are replaced.
    """
    if trainer.current_task is not None:
        raise RuntimeError(
            f"push_to_hub / save_continual_pretrained is called while task '{trainer.current_task.name}' is training; "
            "call it between tasks (the trainer pushes after every task when args.push_to_hub=True)."
        )
    # The old continual_state/ stays until the new one is complete: write_atomically swaps it in
    # (a kill mid-swap leaves the old one as .old-continual_state-*, put back first here).
    ckpt.recover_interrupted_swaps(directory)
    if clean and directory.exists():
        for entry in directory.iterdir():
            if entry.name != STATE_DIR:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in (BASE_CONFIG_DIR, PLOTS_DIR):
        if (directory / entry).is_dir():
            shutil.rmtree(directory / entry)
    directory.mkdir(parents=True, exist_ok=True)
    base = _base_pretrained(trainer.model)
    meta = {
        "format_version": META_FORMAT_VERSION,
        "clm_hf_version": __version__,
        "trainer_class": type(trainer).__name__,
        "model_class": "AutoModelForSeq2SeqLM" if base.config.is_encoder_decoder else "AutoModelForCausalLM",
        "peft": _user_peft(trainer),
        "tasks": [t.to_json() for t in trainer.tasks],
        "strategies": [{"name": s.name, **s.config.to_dict()} for s in trainer.strategies],
        "primary_metric": trainer.results.primary_metric if trainer.results is not None else None,
        "training_args": _safe_training_args(trainer.args),
    }
    meta_text = json.dumps(meta, indent=1, default=str)
    # A fresh continual checkpoint of the state right now (the same as the last end-of-task one).
    # It holds the metadata too, so that its manifest covers the training arguments from_pretrained
    # applies; the copy at the root is for people and tools that look there, and must be identical.
    ckpt.save_continual_checkpoint(
        directory / STATE_DIR, state=trainer._continual_state(), strategies=trainer.strategies,
        model=unwrap_model(trainer.model), results=trainer.results, extra_files={META_FILE: meta_text},
    )
    _save_base_config(base, directory / BASE_CONFIG_DIR)
    (directory / META_FILE).write_text(meta_text, encoding="utf-8")
    if trainer.results is not None and trainer.results.num_trained:
        for path in write_result_files(trainer.results, directory / PLOTS_DIR):
            if path.suffix != ".png":
                path.unlink()  # results.json lives in continual_state/, the tables in README.md
    return directory



def write_run_base(trainer: Any, run_dir: str | os.PathLike) -> Path | None:
    """Write what rebuilds the model and tokenizer into ``<run_dir>/base_model_config/``, atomically.

    The trainer calls it (rank 0) with its first end-of-task continual checkpoint, so that
    ``from_pretrained(<run>)`` and ``from_pretrained(<run>/continual/task-XXX)`` need neither
    ``model=`` nor ``processing_class=``. It holds the config of the pretrained model under any
    wrapper (and its generation config where the model generates), the user's own LoRA adapter
    config when the model is a one-adapter ``PeftModel`` (its weights are in the continual state),
    and ``processing_class.save_pretrained``. No weights.

    Args:
        trainer: The continual trainer.
        run_dir (`str` or `os.PathLike`): The run folder (``output_dir``).

    Returns:
        `pathlib.Path` or `None`: the folder, or `None` on ranks other than 0 and for a model with no
        `PreTrainedModel` inside (nothing to rebuild it from).

    Example:

    >>> write_run_base(trainer, "runs/ewc")  # doctest: +SKIP
    PosixPath('runs/ewc/base_model_config')
    """
    if not trainer.args.should_save:
        return None
    try:
        base = _base_pretrained(trainer.model)
    except TypeError as err:  # a plain nn.Module: no config to save; from_pretrained then asks for model=
        logger.info("clm-hf: no %s/ in %s: %s", BASE_CONFIG_DIR, run_dir, err)
        return None
    peft_configs = getattr(unwrap_model(trainer.model), "peft_config", None) if _user_peft(trainer) else None
    processing = getattr(trainer, "processing_class", None)

    def fill(tmp: Path) -> None:
        _save_base_config(base, tmp)
        # Several user adapters cannot be rebuilt from one adapter_config.json: then model= is needed.
        if peft_configs is not None and len(peft_configs) == 1:
            next(iter(peft_configs.values())).save_pretrained(tmp)
        if processing is not None and callable(getattr(processing, "save_pretrained", None)):
            processing.save_pretrained(tmp)

    return ckpt.write_atomically(Path(run_dir) / BASE_CONFIG_DIR, fill)


class _WritingInto:
    """Point ``args.output_dir`` at ``directory`` and clear ``args.hub_token`` for the Trainer's own save/push."""

    def __init__(self, trainer: Any, directory: Path) -> None:
        self.args, self.directory = trainer.args, directory

    def __enter__(self) -> None:
        self.saved = (self.args.output_dir, self.args.hub_token)
        # training_args.bin is a pickle of the arguments: without this it would carry the token.
        self.args.output_dir, self.args.hub_token = str(self.directory), None

    def __exit__(self, *exc: Any) -> None:
        self.args.output_dir, self.args.hub_token = self.saved


def _model_name(trainer: Any) -> str:
    if trainer.args.hub_model_id:
        return trainer.args.hub_model_id.split("/")[-1]
    return Path(trainer._base_output_dir).absolute().name


def push_to_hub(
    trainer: Any,
    parent_push: Any,
    *,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    **kwargs: Any,
) -> Any:
    """What ``ContinualTrainer.push_to_hub`` does: stage the continual files, then the Trainer's own push.

    Args:
        trainer: The continual trainer.
        parent_push: ``super().push_to_hub`` of the trainer (``Trainer.push_to_hub``).
        commit_message, blocking, token, revision, private, **kwargs: As for
            ``Trainer.push_to_hub``; ``kwargs`` go to the model card (``tags``, ``license``,
            ``language``, ``dataset``, ``finetuned_from``, ``model_name``, ...).

    Returns:
        What ``Trainer.push_to_hub`` returns: the commit info, or a future when ``blocking=False``.
    """
    token = token if token is not None else trainer.args.hub_token
    if trainer.hub_model_id is None:
        # Before output_dir is redirected: the repo is named after the run folder, as usual.
        trainer.init_hf_repo(token=token, private=private)
    previous = getattr(trainer, "_clm_hub_push", None)
    if previous is not None and not previous.done():
        previous.result()  # the folder is about to be rewritten
    folder = Path(trainer._base_output_dir) / HUB_FOLDER
    if trainer.args.should_save:
        _stage(trainer, folder, clean=True)
    kwargs.setdefault("model_name", _model_name(trainer))
    with _WritingInto(trainer, folder), public_uploads(trainer.args, token):
        result = parent_push(commit_message=commit_message, blocking=blocking, token=token, revision=revision,
                             private=private, **kwargs)
    trainer._clm_hub_push = None if blocking else result
    return result


def save_continual_pretrained(trainer: Any, directory: str | os.PathLike, **card_kwargs: Any) -> Path:
    """Write, into a local folder, exactly what :func:`push_to_hub` would upload.

    The folder can be moved anywhere, uploaded with ``huggingface_hub.upload_folder`` and read
    back with :func:`from_pretrained`. Call it between tasks.

    Args:
        trainer: The continual trainer.
        directory: The folder to write (its earlier clm-hf files are replaced).
        **card_kwargs: Model card options (``tags``, ``license``, ``language``, ``model_name``, ...).

    Returns:
        `pathlib.Path`: the folder.

    Example:

    >>> save_continual_pretrained(trainer, "exports/ewc")  # doctest: +SKIP
    >>> trainer = ContinualCausalLMTrainer.from_pretrained("exports/ewc")  # doctest: +SKIP
    """
    directory = Path(directory)
    if trainer.args.should_save:
        _stage(trainer, directory, clean=False)
    card_kwargs.setdefault("model_name", _model_name(trainer))
    with _WritingInto(trainer, directory):
        trainer.save_model(str(directory), _internal_call=True)
        if trainer.args.should_save:
            write_public_training_args(trainer.args, directory)  # the folder is meant to be published
            write_model_card(trainer, directory, **card_kwargs)
    return directory


def task_finished(trainer: Any) -> None:
    """Push after a task when ``args.push_to_hub`` is set (any ``hub_strategy`` but ``"end"``); called by the trainer.

    The first push this trainer makes raises when it fails: a wrong token or repository would
    otherwise fail again after every task of a long run, seen only as warnings. A later failure
    (the Hub or the network down for a while) is a warning and training goes on.

    Raises:
        RuntimeError: The first push failed; the message names the task and the repository, and the
            upload's own error is chained as its cause.
    """
    args = trainer.args
    if not getattr(args, "push_to_hub", False) or args.hub_strategy == "end":
        return
    task = trainer.tasks[-1] if trainer.tasks else None
    message = f"clm-hf: after task {task.index} ({task.name})" if task is not None else "clm-hf: continual state"
    first = not trainer._hub_pushed
    trainer._hub_pushed = True  # attempted: only the first attempt of the run may stop it
    try:
        trainer.push_to_hub(commit_message=message, blocking=True)
    except Exception as err:  # noqa: BLE001 - any upload error: first push raises, later ones warn
        where = f"task {task.index} ('{task.name}')" if task is not None else "the continual state"
        if first:
            repo = getattr(trainer, "hub_model_id", None) or getattr(args, "hub_model_id", None)
            # Without continual checkpoints there is nothing on disk to resume from.
            if trainer._setting("save_continual_state"):
                then = ("What is saved on disk stays: fix the setting and resume with resume_from_checkpoint=True.")
            else:
                then = ("With save_continual_state=False no continual checkpoint was written, so nothing can be "
                        "resumed: fix the setting and re-run the stream from the start.")
            raise RuntimeError(
                f"Pushing to the Hub after {where}, the first push of this run, failed: {err}. Check the "
                f"repository (hub_model_id={repo!r}) and the token (hub_token or `hf auth login`); the run stops "
                f"here rather than fail the same way after every task. {then} Later push failures are only warnings."
            ) from err
        # The run goes on; the state is on disk and the next push (or a manual one) uploads it.
        logger.warning("clm-hf: pushing to the Hub after %s failed: %s", where, err)


# --- the model card --------------------------------------------------------------------------------------
def model_card(
    trainer: Any,
    *,
    model_name: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> str:
    """The model card (``README.md``) of a continual run, metadata header included.

    It lists the task sequence, the strategies and their settings, the score matrices as Markdown
    tables with ACC/BWT/FWT/forgetting, the plots, the training arguments that matter and how to
    continue the stream. Metadata tags: ``continual-learning``, ``clm-hf``, each strategy's
    name (``sequential-fine-tuning`` without one) and any ``tags`` given.
    """
    from huggingface_hub import ModelCardData

    model_name = model_name or _model_name(trainer)
    strategies = [s.name for s in trainer.strategies] or ["sequential-fine-tuning"]
    all_tags = ["continual-learning", "clm-hf", *strategies]
    for tag in [tags] if isinstance(tags, str) else (tags or []):
        if tag not in all_tags:
            all_tags.append(tag)
    base = _base_pretrained(trainer.model)
    if finetuned_from is None:
        name = getattr(base.config, "_name_or_path", "") or ""
        finetuned_from = name if name and not os.path.isdir(name) else None
    seq2seq = bool(base.config.is_encoder_decoder)
    peft = _user_peft(trainer)
    data = ModelCardData(
        model_name=model_name, language=language, license=license, tags=all_tags, base_model=finetuned_from,
        datasets=[dataset] if isinstance(dataset, str) else dataset,
        library_name="peft" if peft else "transformers",
        pipeline_tag="text2text-generation" if seq2seq else "text-generation",
    )
    data_dict = data.to_dict()
    if tasks:
        data_dict["task_categories"] = [tasks] if isinstance(tasks, str) else list(tasks)
    header = ModelCardData(**data_dict).to_yaml()

    results = trainer.results
    trained = list(trainer.tasks)
    stream = list(results.task_names) if results is not None else [t.name for t in trained]
    trained_names = {t.name for t in trained}
    lines = [f"# {model_name}", ""]
    lines += [
        f"This model learned a stream of {len(trained)} task(s), one after the other, with the clm-hf continual "
        f"learning trainer (`{type(trainer).__name__}`, strategies: {', '.join(strategies)}). The repository also "
        f"holds the whole continual state (`{STATE_DIR}/`), so the stream can be continued with more tasks.",
        "",
        "## Task sequence",
        "",
        "| # | task id | task | trained |",
        "| ---: | :--- | :--- | :--- |",
    ]
    ids = {t.name: t.task_id for t in trained}
    for i, name in enumerate(stream):
        lines.append(f"| {i} | {ids.get(name, '')} | {name} | {'yes' if name in trained_names else 'not yet'} |")
    lines += ["", "## Strategies", "", _strategies_markdown(trainer.strategies), ""]
    lines += ["## Results", ""]
    if results is not None and results.num_trained:
        lines += [
            "Scores on every task after each training stage (`baseline` = before any training). ACC is the mean "
            "final score, BWT the mean change of earlier tasks since they were learned (negative = forgetting), "
            "FWT the mean gain on a task before learning it, forgetting the mean drop from each task's best score.",
            "",
            results_markdown(results, heading_level=3),
            f"![score heatmap]({PLOTS_DIR}/heatmap.png)",
            "",
            f"![scores across the stream]({PLOTS_DIR}/task_curves.png)",
            "",
        ]
    else:
        lines += ["No task trained yet.", ""]
    args = trainer.args
    lines += ["## Training settings (each task)", ""]
    for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay",
                "max_grad_norm", "seed", "eval_metrics", "primary_metric"):
        if hasattr(args, key):
            value = getattr(args, key)
            lines.append(f"- {key}: {getattr(value, 'value', value)}")
    repo = trainer.hub_model_id or args.hub_model_id or model_name
    lines += [
        "",
        "## Continue the stream",
        "",
        "```python",
        f"from clm_hf import {type(trainer).__name__}",
        "",
        f'trainer = {type(trainer).__name__}.from_pretrained("{repo}", output_dir="runs/continued")',
        "# the same first tasks (they are skipped), then the new ones:",
        "results = trainer.fit(stream, resume_from_checkpoint=True)",
        "```",
        "",
        "## Framework versions",
        "",
    ]
    lines += _versions()
    return f"---\n{header}\n---\n\n" + "\n".join(lines) + "\n"


def _versions() -> list[str]:
    import importlib.metadata as metadata

    lines = [f"- clm-hf {__version__}"]
    for package in ("transformers", "torch", "datasets", "peft", "huggingface_hub"):
        try:
            lines.append(f"- {package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return lines


def write_model_card(trainer: Any, directory: str | os.PathLike | None = None, **kwargs: Any) -> Path | None:
    """Write :func:`model_card` to ``<directory>/README.md`` (default ``args.output_dir``), on the main process."""
    if not trainer.is_world_process_zero():
        return None
    directory = Path(directory if directory is not None else trainer.args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    path.write_text(model_card(trainer, **kwargs), encoding="utf-8")
    return path


# --- reading back ------------------------------------------------------------------------------------------
def _resolve(path_or_repo: str | os.PathLike, *, token: Any, revision: str | None, cache_dir: Any) -> Path:
    path = Path(path_or_repo)
    if path.exists():
        return path
    import huggingface_hub

    local = huggingface_hub.snapshot_download(repo_id=str(path_or_repo), revision=revision, token=token,
                                              cache_dir=cache_dir, ignore_patterns=_ROOT_WEIGHTS)
    return Path(local)


def _run_config_dir(run: Path) -> Path | None:
    """A run folder's model config: ``base_model_config/`` (written with its first checkpoint), else its root."""
    for candidate in (run / BASE_CONFIG_DIR, run):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _find_state(root: Path) -> tuple[Path, Path | None]:
    """(the continual checkpoint to resume from, the folder with the model's config or None)."""
    if (root / STATE_DIR / ckpt.MANIFEST).is_file():
        return root / STATE_DIR, root / BASE_CONFIG_DIR
    if (root / ckpt.MANIFEST).is_file():  # a checkpoint folder: <run>/continual/task-XXX
        return root, _run_config_dir(root.parent.parent)
    latest = ckpt.latest_valid_checkpoint(ckpt.list_checkpoints(root / CONTINUAL_DIR))
    if latest is None:
        raise FileNotFoundError(
            f"{root} holds no clm-hf continual state: expected {STATE_DIR}/ (a pushed or exported run), "
            f"{CONTINUAL_DIR}/task-XXX/ (a run folder) or a checkpoint folder with {ckpt.MANIFEST}."
        )
    return latest, _run_config_dir(root)


def _read_meta(root: Path, state_dir: Path) -> dict[str, Any]:
    """``clm_hf_continual.json``, only as covered by the continual state's manifest (already verified).

    Its training arguments are applied to the new trainer, so a copy the manifest does not cover
    (an edited root copy, or an export from before the metadata moved into the state) is refused.
    """
    covered, loose = state_dir / META_FILE, root / META_FILE
    if not covered.is_file():
        if loose.is_file():
            raise ckpt.CheckpointError(
                f"{loose} is not covered by the manifest of {state_dir}, so the training arguments in it cannot be "
                "checked. Export or push the run again with this clm-hf version, or remove the file and pass args=."
            )
        return {}
    text = covered.read_text(encoding="utf-8")
    if loose.is_file() and loose.resolve() != covered.resolve() and loose.read_text(encoding="utf-8") != text:
        raise ckpt.CheckpointError(f"{loose} differs from {covered}, the copy its manifest covers: it was edited.")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ckpt.CheckpointError(f"{covered} is not valid JSON ({err}).") from err
    if not isinstance(meta, dict):
        raise ckpt.CheckpointError(f"{covered} is malformed: it holds a {type(meta).__name__}, not an object.")
    return meta


def _strategy_specs(saved: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for entry in saved:
        if entry["name"] not in STRATEGY_REGISTRY and importlib.util.find_spec(f"clm_hf.strategies.{entry['name']}"):
            importlib.import_module(f"clm_hf.strategies.{entry['name']}")  # a built-in not imported yet
        cls = get_strategy_class(entry["name"])
        init = {f.name for f in dataclasses.fields(cls.config_class) if f.init}
        specs.append({"name": entry["name"], **{k: v for k, v in entry["config"].items() if k in init}})
    return specs


def _training_args(trainer_cls: Any, saved: Mapping[str, Any] | None, output_dir: str) -> Any:
    args_class = trainer_cls.args_class
    init = {f.name for f in dataclasses.fields(args_class) if f.init}
    values = {k: v for k, v in (saved or {}).items() if k in init and not k.endswith("_token")}
    # Where the continued run writes, and no automatic push (push_to_hub() still can).
    values.update(output_dir=output_dir, push_to_hub=False)
    values.pop("logging_dir", None)
    return args_class(**values)


def _build_model(config_dir: Path, root: Path, meta: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

    config = AutoConfig.from_pretrained(config_dir)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)  # random weights: the continual state's weights replace them all
    if (config_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(config_dir)
    if meta.get("peft"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, root, is_trainable=True)
    elif (config_dir / "adapter_config.json").is_file():
        # A run folder's base_model_config/ holds the user's adapter config only: the adapter's
        # weights, like every other weight, come from the continual state.
        from peft import PeftConfig, get_peft_model

        model = get_peft_model(model, PeftConfig.from_pretrained(config_dir))
    return model


def from_pretrained(
    trainer_cls: Any,
    path_or_repo: str | os.PathLike,
    *,
    args: Any = None,
    strategies: Sequence[Any] | None = None,
    model: Any = None,
    processing_class: Any = None,
    output_dir: str | os.PathLike | None = None,
    eval_datasets: Mapping[str, Any] | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """Rebuild a continual trainer, with its whole state, from a pushed or saved run.

    ``path_or_repo`` is a Hub repository id (downloaded with ``huggingface_hub.snapshot_download``,
    without the root model weights, which resuming does not need), a folder written by
    :func:`save_continual_pretrained` or pushed, a run's ``output_dir``, or one of its
    ``continual/task-XXX`` checkpoints. The returned trainer has the model (rebuilt from its
    config, then loaded with the continual weights), the tokenizer, the strategies (built from the
    saved settings) with their states, the tasks done and the score matrices; the checkpoint is
    copied into ``<output_dir>/continual/`` so that new checkpoints follow it.

    Continue with ``trainer.fit(stream)`` (the whole stream, whose tasks already done are skipped
    while their eval sets are scored after each new task; or only the new tasks, given as a dict),
    ``trainer.fit(stream, resume_from_checkpoint=True)`` (the whole stream), or
    ``trainer.train_task(next_task, eval_rows)``; with ``train_task`` or a stream of only new
    tasks, pass the earlier tasks' evaluation rows as ``eval_datasets`` so that they are scored too.

    Args:
        trainer_cls: The trainer class to build (``ContinualCausalLMTrainer``, ...).
        path_or_repo: Where the run is.
        args (`ContinualTrainingArguments`, *optional*): Defaults to the saved arguments with
            ``output_dir`` replaced and ``push_to_hub=False``.
        strategies (`list[Strategy]`, *optional*): Defaults to the saved ones; if given, they must
            have the saved names and settings.
        model (*optional*): The model *before* any strategy touched it (needed only for a run folder
            with neither ``base_model_config/`` nor a root ``config.json``); by default built from the
            saved config.
        processing_class (*optional*): Defaults to the saved tokenizer (``base_model_config/``, else the root).
        output_dir (*optional*): Where the continued run writes when ``args`` is not given;
            defaults to ``path_or_repo`` itself for a local run folder, else ``clm_hf_output``.
        eval_datasets (`dict[str, Dataset]`, *optional*): Task id -> evaluation rows of tasks done.
        token, revision, cache_dir: For the Hub download.
        **trainer_kwargs: Any other trainer argument (``callbacks``, ``data_collator``, ...).

    Returns:
        The trainer, ready to continue the stream.
    """
    root = _resolve(path_or_repo, token=token, revision=revision, cache_dir=cache_dir)
    state_dir, config_dir = _find_state(root)
    state = ckpt.read_continual_state(state_dir)  # verifies every file against the manifest
    meta = _read_meta(root, state_dir)
    has_config = config_dir is not None and (config_dir / "config.json").is_file()
    tokenizer_dir = next((d for d in (config_dir, root) if d is not None and (d / "tokenizer_config.json").is_file()),
                         None)
    if model is None and not has_config:
        # Name both pieces at once when both are missing (a run folder from before base_model_config/).
        also = (" and processing_class= (the tokenizer of the first run; its saved copy is missing too)"
                if processing_class is None and tokenizer_dir is None else "")
        raise FileNotFoundError(
            f"{root} has no model config to rebuild the model from (a run folder gets {BASE_CONFIG_DIR}/ with its "
            "first continual checkpoint); pass model= (the model as it was before training, e.g. the same "
            f"from_pretrained(...) call as the first run){also}."
        )
    if model is None:
        model = _build_model(config_dir, root, meta)
    if processing_class is None and tokenizer_dir is not None:
        from transformers import AutoTokenizer

        processing_class = AutoTokenizer.from_pretrained(tokenizer_dir)
    if strategies is None:
        strategies = strategies_from_specs(_strategy_specs(state["strategies"]))
    if args is None:
        is_run_folder = state_dir.parent.name == CONTINUAL_DIR and state_dir.parent.parent == root
        default_dir = root if is_run_folder else Path("clm_hf_output")
        if "training_args" not in meta:
            logger.warning("clm-hf: %s does not record the training arguments; continuing with %s defaults "
                           "(pass args= to train the next tasks as the first ones).", root, trainer_cls.args_class.__name__)
        args = _training_args(trainer_cls, meta.get("training_args"), str(output_dir or default_dir))
    elif output_dir is not None and Path(output_dir) != Path(args.output_dir):
        raise ValueError(f"output_dir={output_dir!r} differs from args.output_dir={args.output_dir!r}; give it once.")
    trainer = trainer_cls(model=model, args=args, processing_class=processing_class, strategies=list(strategies),
                          **trainer_kwargs)
    done = state["tasks"]
    if not done:
        raise ValueError(f"The continual state in {state_dir} has no finished task to continue from.")
    target = Path(trainer._base_output_dir) / CONTINUAL_DIR / f"task-{len(done) - 1:03d}"
    if target.resolve() != state_dir.resolve():
        others = [p for p in ckpt.list_checkpoints(target.parent) if p.name != target.name]
        if others:
            raise ValueError(
                f"{trainer._base_output_dir} already holds another run ({others[-1]}); continue into an empty output_dir."
            )
        ckpt.write_atomically(target, lambda tmp: shutil.copytree(state_dir, tmp, dirs_exist_ok=True))
    specs = [{"task_id": t["task_id"], "name": t["name"]} for t in done]
    trainer.resume_stream(str(target), specs)
    for task_id, rows in (eval_datasets or {}).items():
        name = next((t["name"] for t in done if t["task_id"] == str(task_id)), None)
        trainer.add_eval_task(task_id, rows, name)
    logger.info("clm-hf: restored %d task(s) from %s; the stream continues in %s", len(done), root,
                trainer._base_output_dir)
    return trainer
