"""The strategy protocol, the config base class and the strategy registry.

A strategy is one continual-learning method. The trainer only ever calls the hooks of
:class:`Strategy`, in the order the user listed the strategies, so a new method is one new
module plus a :func:`register_strategy` entry and the trainer never changes.

Every hook is a no-op by default; a strategy overrides the few it needs:

============================  ============================================================
hook                          called
============================  ============================================================
``setup(trainer)``            once, when the trainer is built (check backend support)
``prepare_model(model, t)``   before task ``t`` (PNN adds a column, PackNet installs masks)
``prepare_train_dataset``     before task ``t``: may mix extra rows in (replay)
``select_train_rows``         when each epoch starts: which of those rows it trains on
``before_task(trainer, t)``   right before training ``t`` (snapshot a teacher, ...)
``loss(model, in, out)``      every training micro-batch: extra loss terms, by name
``edit_gradients(model)``     after backward + accumulation, before clipping and ``step()``
``after_optimizer_step``      right after ``optimizer.step()`` (restore frozen weights)
``logged_values(model)``      at each logging step: values to log that are not loss terms
``after_task(trainer, t)``    after training ``t`` (Fisher, pruning, fill a memory)
``use_task(model, t)``        context manager: behave as right after task ``t``
``state_dict`` / ``load``     checkpointing (tensors go to safetensors, the rest to JSON)
============================  ============================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

# Model helpers live in the low clm_hf.modeling module; re-exported for the strategies and old imports.
from ..modeling import eval_mode, trainable_parameters, unwrap_model  # noqa: F401
from ..sharding import is_dtensor

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

    from ..trainer import ContinualTrainer


@dataclass
class TaskInfo:
    """What a strategy knows about a task.

    Args:
        task_id (`str`): The task's identifier (user ids are normalised to strings).
        name (`str`): A human-readable name, used in logs, tables and plots.
        index (`int`): Position of the task in the stream, from 0.
        train_dataset (`datasets.Dataset`, *optional*): The task's own tokenized training rows,
            before any strategy mixed other rows in.
        resumed (`bool`): True when training of this task restarts from a mid-task checkpoint, so
            state that ``before_task`` would snapshot was restored instead.

    Example:

    >>> from clm_hf.strategies import TaskInfo
    >>> task = TaskInfo(task_id="qa", name="qa", index=1)
    >>> task.to_json()
    {'task_id': 'qa', 'name': 'qa', 'index': 1}
    """

    task_id: str
    name: str
    index: int
    train_dataset: Dataset | None = field(default=None, repr=False, compare=False)
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The task's identity as JSON (``task_id``, ``name``, ``index``), as checkpoints and results record it.

        ``train_dataset`` and ``resumed`` belong to the running process and are left out.
        """
        return {"task_id": self.task_id, "name": self.name, "index": self.index}


@dataclass
class StrategyConfig:
    """Base class of every strategy's config.

    Subclasses are dataclasses whose fields carry ``metadata={"help": ...}``; they validate in
    ``validate`` (called from ``__post_init__``) and raise ``ValueError`` naming the field. A
    config round-trips through JSON with :meth:`to_dict` / :meth:`from_dict` (checkpoints and
    model cards store it so).

    Args:
        **fields: The subclass's dataclass fields; the base class has none. ``aliases`` (a class
            attribute, ``{other spelling: field}``) lists the other names :meth:`from_dict` accepts.

    Example:

    >>> from dataclasses import dataclass
    >>> from clm_hf.strategies import StrategyConfig
    >>> @dataclass
    ... class MyConfig(StrategyConfig):
    ...     aliases = {"lambda": "strength"}
    ...     strength: float = 1.0
    ...     def validate(self):
    ...         if self.strength < 0:
    ...             raise ValueError(f"strength must be >= 0, got {self.strength}.")
    >>> MyConfig.from_dict({"lambda": 2.0}).to_dict()
    {'strength': 2.0}
    >>> MyConfig(strength=-1.0)
    Traceback (most recent call last):
        ...
    ValueError: strength must be >= 0, got -1.0.
    """

    # Other spellings accepted for a field, e.g. ``{"lambda": "ewc_lambda"}`` (the original
    # config-dict quick start used ``lambda``, a Python keyword).
    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` when a value is out of range. Override in subclasses."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (nested dataclasses too), which :meth:`from_dict` turns back into the config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any], *, owner: str | None = None) -> "StrategyConfig":
        """Build the config from a dict, resolving aliases; unknown keys raise with a suggestion."""
        valid = [f.name for f in fields(cls) if f.init]
        resolved: dict[str, Any] = {}
        for key, value in options.items():
            key = cls.aliases.get(key, key)
            if key not in valid:
                raise ValueError(_unknown_message(f"option '{key}'", owner or cls.__name__, key, valid + list(cls.aliases)))
            resolved[key] = value
        return cls(**resolved)


def _unknown_message(what: str, where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown {what} for {where}.{hint} Valid: {', '.join(sorted(valid))}."


def check_range(name: str, value: float, *, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise a ``ValueError`` naming ``name`` when ``value`` falls outside the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if value != value:  # NaN passes every comparison below
        raise ValueError(f"{name} must be a number, got NaN.")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        left = ("[" if low_inclusive else "(") + (str(low) if low is not None else "-inf")
        right = (str(high) if high is not None else "inf") + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {left}, {right}; got {value!r}.")


class Strategy:
    """Base class of continual-learning strategies. Every hook is a no-op by default.

    Subclasses set ``name`` (the registry key) and ``config_class``, and are built either from a
    config object or from keyword arguments that become the config. The hooks and the class
    attributes a trainer reads (``supports_fsdp``, ``side_columns``, ...) are listed in the module
    docstring and in docs/api.md.

    Args:
        config ([`StrategyConfig`], *optional*): An instance of the subclass's ``config_class``.
        **options: Or the config's fields (or their aliases) as keyword arguments; not both.

    Raises:
        ValueError: Both a config and options were given, or an option is unknown or out of range.
        TypeError: ``config`` is not an instance of ``config_class``.

    Example:

    >>> from clm_hf import EWC
    >>> EWC(ewc_lambda=50.0).config.ewc_lambda
    50.0
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    # Columns this strategy adds to training rows (in prepare_train_dataset) for its own use in
    # ``loss``: the trainer keeps them through the collator and hides them from the model.
    side_columns: ClassVar[tuple[str, ...]] = ()
    # True when the strategy never reads whole parameters (works on DeepSpeed ZeRO-3 and FSDP).
    supports_partitioned_parameters: ClassVar[bool] = False
    # True when the strategy reads the whole gradient on every rank (FSDP and DeepSpeed shard it).
    needs_whole_gradients: ClassVar[bool] = False
    # True when the strategy works on FSDP2's sharded (DTensor) parameters and gradients: its state
    # is sharded like the parameters, and whatever needs the global tensor reduces over the ranks.
    # Checked by tests/test_fsdp.py against an unsharded run of the same stream.
    supports_fsdp: ClassVar[bool] = False
    # Names of loss terms that are means over the micro-batch's supervised tokens (``labels !=
    # -100``, shifted for a causal LM as its loss shifts them). When the model's loss is normalised
    # over the whole accumulated batch (``num_items_in_batch``), the trainer weights these terms by
    # the micro-batch's share of its tokens, as the model's loss, so that their gradient does not
    # depend on how a batch is split into micro-batches. Other terms (a penalty on the weights) are
    # divided by the number of accumulation steps.
    per_token_terms: ClassVar[tuple[str, ...]] = ()
    # True when a task given as a stream (IterableDataset, read once while it trains) is enough:
    # the strategy never reads the task's rows again after training (see docs/data.md).
    supports_streaming: ClassVar[bool] = False
    # True when ``loss`` reads ``outputs.logits`` (with gradient). Trainers whose model loss does not
    # build the logits (TRL's fused LM head) then run the model's ordinary forward instead.
    uses_output_logits: ClassVar[bool] = False
    # False when the strategy needs one row per example in its batches (per-row side columns,
    # per-row memories): TRL's padding-free packing flattens a batch into one sequence.
    supports_packed_rows: ClassVar[bool] = True
    # True when ``edit_gradients`` only adds the gradient of a loss term (EWC's penalty) that the
    # strategy could equally return from ``loss``: the trainer runs such edits before every other
    # strategy's (so a GEM projection or a PackNet mask sees the gradient of the whole loss, as with
    # autograd), and does not refuse the strategy on a backend whose gradients cannot be edited
    # (DeepSpeed), where the strategy must return the term from ``loss`` instead.
    adds_loss_gradient: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ValueError(f"{type(self).__name__}: pass either a config object or keyword options, not both.")
        if config is None:
            config = self.config_class.from_dict(options, owner=type(self).__name__)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config
        self.trainer: ContinualTrainer | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def torch_compile_problem(self) -> str | None:
        """Why this strategy, with its options, cannot train under ``torch_compile=True`` (``None``: it can).

        The trainer refuses the combination at start-up with this reason (see
        ``docs/benchmarks.md``, compatibility matrix).

        >>> Strategy().torch_compile_problem() is None
        True
        """
        return None

    def generation_problem(self, model: nn.Module) -> str | None:
        """Why this strategy, with its options, cannot generate answers with ``model`` (``None``: it can).

        Asked when the trainer is built and when ``fit``/``train_task`` start, if generated answers
        are scored after every task (``generation_metrics`` or a ``generation_scorer``): the
        trainer then refuses the run with this reason before anything trains.

        >>> Strategy().generation_problem(None) is None
        True
        """
        return None

    def export_model(self, model: nn.Module, task: TaskInfo | None) -> nn.Module:
        """The model :meth:`ContinualTrainer.export_model` writes: a plain Hugging Face model for ``from_pretrained``.

        Called before anything is written, on the unwrapped model (inside ``trainer.use_task(task)``
        when a task is given), with the model the previous strategy returned. Return ``model``
        itself (the default), a copy to write instead (e.g. LoRA adapters merged into the base,
        leaving the trainer's model as it is), or raise a ``ValueError`` saying what to use instead
        when the strategy's model has no ``from_pretrained`` form.

        Args:
            model (`nn.Module`): The model to write so far.
            task ([`TaskInfo`], *optional*): The task the export is for, ``None`` when none was given.

        Returns:
            `nn.Module`: the model to write.

        >>> Strategy().export_model("the model", None)
        'the model'
        """
        return model

    # --- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: ContinualTrainer) -> None:
        """Called once when the trainer is built. Keep a handle and check backend support."""
        self.trainer = trainer

    def prepare_model(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        """Return the model to train on ``task`` (the same object unless the method grows it)."""
        return model

    def prepare_train_dataset(self, dataset: Dataset, task: TaskInfo) -> Dataset:
        """Return the rows to train ``task`` on (replay mixes memory rows in here)."""
        return dataset

    def select_train_rows(self, num_rows: int, task: TaskInfo, epoch: int) -> Sequence[int] | None:
        """The rows of ``task``'s training dataset to train on in ``epoch``, or ``None`` for all of them.

        Called when each epoch of the task's training starts (not for extra phases such as PackNet's
        retraining). ``num_rows`` is the length of the dataset the ``prepare_train_dataset`` hooks
        returned; indices are into it and may repeat. Every epoch must select the same number of
        rows (the Trainer fixes the steps per epoch), and the choice must depend only on ``task``,
        ``epoch`` and saved state, so that resuming inside an epoch trains on the same rows. The
        trainer shuffles the selection as it would shuffle the whole dataset. At most one strategy
        of a trainer may select rows.
        """
        return None

    def before_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        """Called right before ``trainer.train()`` for ``task``."""

    def loss(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms for one training micro-batch, by name (the name is what gets logged).

        ``inputs`` holds the model inputs plus every strategy's side columns; ``outputs`` is the
        model's output on those inputs (logits included).
        """
        return {}

    def edit_gradients(self, model: nn.Module) -> None:
        """Edit ``p.grad`` in place after accumulation (and the DDP all-reduce), before ``optimizer.step()``.

        It runs before gradient clipping, on unscaled gradients under fp16, so the clip norm is that
        of the edited gradient (the one the optimizer uses).
        """

    def edit_zero_gradients(self, model: nn.Module, gradients: Any) -> None:
        """Under DeepSpeed ZeRO-2: edit this rank's partition of the reduced gradient, in place.

        DeepSpeed steps its optimizer inside ``backward()``, before :meth:`edit_gradients` could
        run, and by then each rank holds only its partition of the reduced gradient. A strategy
        that implements this hook is called at the start of ZeRO-2's optimizer step instead (before
        its clipping), on every rank, with a
        :class:`~clm_hf.deepspeed_support.Zero2GradientPartition` (``read()`` / ``write()`` the
        flat partition, ``slice_rows`` to cut whole tensors like it, ``all_reduce_sum`` for sums
        over all coordinates); its :meth:`edit_gradients` is then not called. Implementing it is
        what lets the trainer run the strategy on ZeRO-2 (ZeRO-3 stays refused).

        Args:
            model (`nn.Module`): The model being trained (whole weights on every rank under ZeRO-2).
            gradients (:class:`~clm_hf.deepspeed_support.Zero2GradientPartition`): This rank's
                partition of the reduced gradient of every parameter group.
        """

    def edit_zero_master_weights(self, model: nn.Module, master: Any) -> None:
        """Under DeepSpeed ZeRO-2: edit this rank's fp32 master weights of one parameter group after their update.

        ZeRO-2's optimizer updates each rank's fp32 master partition, not the model's weights, and
        copies it over them at every step (inside ``backward()``), so a weight written in
        :meth:`after_optimizer_step` would be overwritten by the next step. A strategy that
        implements this hook is called inside ZeRO-2's step, for each parameter group, between the
        inner optimizer's update and that copy, on every rank, with a
        :class:`~clm_hf.deepspeed_support.Zero2MasterPartition` (``weights``, the flat master
        partition to edit in place, and ``slice_rows`` to cut whole tensors like it); its
        :meth:`after_optimizer_step` is then not called. Implementing it (with
        :meth:`edit_zero_gradients` if the strategy also edits gradients) is what lets the trainer
        run a strategy that writes weights after the step on ZeRO-2.

        Args:
            model (`nn.Module`): The model being trained (whole weights on every rank under ZeRO-2).
            master (:class:`~clm_hf.deepspeed_support.Zero2MasterPartition`): This rank's fp32 master
                partition of the group just updated.
        """

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called right after ``optimizer.step()``."""

    def logged_values(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Values to log, by name, at each logging step, computed then rather than at every step.

        For a quantity that is not returned from ``loss`` (EWC's penalty when its gradient is added
        in ``edit_gradients``): it is logged next to the loss terms and checked to be finite.
        """
        return {}

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        """Called after ``task`` has been trained (and before it is evaluated)."""

    def use_task(self, model: nn.Module, task: TaskInfo) -> contextlib.AbstractContextManager:
        """Context in which ``model`` behaves as it did for ``task``. A no-op by default."""
        return contextlib.nullcontext()

    def before_save(self, trainer: ContinualTrainer) -> None:
        """Called on every rank right before the trainer writes a mid-task continual checkpoint.

        The state is then written by rank 0 (:meth:`state_dict`), or, under FSDP2, shard by shard by
        every rank. A strategy whose state is split across the ranks in a way the writer cannot read
        by itself (EWC's slices of DeepSpeed ZeRO-3 partitions) gathers it here: every rank calls
        this hook, in the same order, so collectives may run. Pair it with :meth:`after_save`.

        >>> Strategy().before_save(None)  # a no-op by default
        """

    def after_save(self, trainer: ContinualTrainer) -> None:
        """Called on every rank once that checkpoint is written (also when writing it failed): drop
        whatever :meth:`before_save` gathered, so it does not hold memory while training goes on."""

    def restore_model(self, model: nn.Module) -> nn.Module:
        """After ``load_state``: rebuild any architecture the method added before weights load."""
        return model

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors and JSON-able values, possibly nested in dicts."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def save_state(self, directory: str | os.PathLike) -> None:
        """Write the state into ``directory`` (safetensors for tensors, JSON for the rest)."""
        save_tensor_json_state(self.state_dict(), directory)

    def load_state(self, directory: str | os.PathLike) -> None:
        """Read what :meth:`save_state` wrote."""
        self.load_state_dict(load_tensor_json_state(directory))


# --- registry --------------------------------------------------------------------------------
STRATEGY_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator that adds a strategy under its ``name``; a duplicate name is an error.

    Registered strategies can be named in recipes, config dicts and :func:`build_strategy`.

    Args:
        cls (`type[Strategy]`): The strategy class; its ``name`` (lower-cased) is the key.

    Returns:
        `type[Strategy]`: ``cls`` itself, so it works as a decorator.

    Raises:
        ValueError: Another class is already registered under that name.

    Example:

    >>> from clm_hf.strategies import STRATEGY_REGISTRY, Strategy, register_strategy
    >>> @register_strategy
    ... class Frozen(Strategy):
    ...     name = "doc_frozen"
    >>> STRATEGY_REGISTRY["doc_frozen"] is Frozen
    True
    >>> del STRATEGY_REGISTRY["doc_frozen"]  # keep the registry as it was
    """
    key = cls.name.lower()
    if key in STRATEGY_REGISTRY and STRATEGY_REGISTRY[key] is not cls:
        raise ValueError(f"A strategy named '{key}' is already registered ({STRATEGY_REGISTRY[key].__name__}).")
    STRATEGY_REGISTRY[key] = cls
    return cls


def get_strategy_class(name: str) -> type[Strategy]:
    """Look a strategy class up by name; an unknown name raises with the closest valid one.

    Args:
        name (`str`): The registry key, case-insensitive; ``-`` reads as ``_``.

    Returns:
        `type[Strategy]`: The registered class.

    Raises:
        ValueError: No strategy has that name; the message suggests the closest and lists all.

    Example:

    >>> from clm_hf.strategies import get_strategy_class
    >>> get_strategy_class("EWC").__name__
    'EWC'
    >>> get_strategy_class("replya")
    Traceback (most recent call last):
        ...
    ValueError: Unknown strategy 'replya' for clm_hf. Did you mean 'replay'? Valid: ...
    """
    key = name.lower().replace("-", "_")
    if key not in STRATEGY_REGISTRY:
        raise ValueError(_unknown_message(f"strategy '{key}'", "clm_hf", key, list(STRATEGY_REGISTRY)))
    return STRATEGY_REGISTRY[key]


def build_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy from its name and options.

    Args:
        name (`str`): The registry key (see :func:`get_strategy_class`).
        **options: The strategy's config fields or their aliases.

    Returns:
        [`Strategy`]: The new strategy.

    Example:

    >>> from clm_hf.strategies import build_strategy
    >>> build_strategy("ewc", ewc_lambda=10.0).name
    'ewc'
    """
    return get_strategy_class(name)(**options)


def strategies_from_specs(specs: list[dict[str, Any] | str | Strategy]) -> list[Strategy]:
    """Turn recipe entries (``{"name": "ewc", ...}``, ``"replay"`` or objects) into strategies.

    Args:
        specs (`list`): Each entry a dict with a ``name`` key and the strategy's options, a
            strategy name, or a [`Strategy`] (kept as it is). The order is the order of application.

    Returns:
        `list[Strategy]`: One strategy per entry.

    Raises:
        ValueError: A dict has no ``name``, or a name or option is unknown.
        TypeError: An entry is of another type.

    Example:

    >>> from clm_hf import EWC
    >>> from clm_hf.strategies import strategies_from_specs
    >>> built = strategies_from_specs([{"name": "replay", "buffer_size": 64}, "lwf", EWC()])
    >>> [s.name for s in built], built[0].config.buffer_size
    (['replay', 'lwf', 'ewc'], 64)
    """
    built = []
    for spec in specs:
        if isinstance(spec, Strategy):
            built.append(spec)
        elif isinstance(spec, str):
            built.append(build_strategy(spec))
        elif isinstance(spec, dict):
            if "name" not in spec:
                raise ValueError(f"A strategy entry needs a 'name' key; got {spec!r}.")
            options = {k: v for k, v in spec.items() if k != "name"}
            built.append(build_strategy(spec["name"], **options))
        else:
            raise TypeError(f"Cannot build a strategy from {type(spec).__name__}: {spec!r}.")
    return built


# --- persistence of nested tensor/JSON state -------------------------------------------------
_TENSORS_FILE = "state.safetensors"
_JSON_FILE = "state.json"
_TENSOR_MARK = "__tensor__"


_SHARDED_MARK = "__sharded__"
# Set by :func:`sharded_state_io` while a continual checkpoint of an FSDP2-sharded model is written or read.
_SHARDED_IO: dict[str, Any] = {"scope": None, "collect": None, "loaded": None, "convert": None}


@contextlib.contextmanager
def sharded_state_io(scope: str, *, collect: dict[str, torch.Tensor] | None = None,
                     loaded: dict[str, torch.Tensor] | None = None, convert: Any = None):
    """Route sharded strategy tensors through ``torch.distributed.checkpoint`` instead of safetensors.

    Used by :mod:`clm_hf.state` around a strategy's ``save_state`` / ``load_state`` when the model is
    sharded with FSDP2. While writing, each DTensor in the state goes into ``collect`` under
    ``"<scope>/<key>"`` and ``state.json`` records a ``{"__sharded__": "<scope>/<key>"}`` marker (every
    rank then writes its shards with DCP). While reading, a marker is replaced by ``loaded[...]``,
    and ``convert(key, tensor)`` may reshard a plain tensor read from ``state.safetensors`` (a
    checkpoint written by an unsharded run).

    Args:
        scope (`str`): The strategy's folder name inside the checkpoint (``"00-ewc"``).
        collect (`dict`, *optional*): Receives the DTensors to write.
        loaded (`dict`, *optional*): The tensors read back, by the same keys.
        convert (`Callable[[str, torch.Tensor], torch.Tensor]`, *optional*): Applied to plain tensors read.

    >>> import tempfile, torch
    >>> folder, found = tempfile.mkdtemp(), {}
    >>> with sharded_state_io("00-x", collect=found):  # a plain tensor still goes to safetensors
    ...     save_tensor_json_state({"w": torch.ones(2)}, folder)
    >>> found
    {}
    """
    previous = dict(_SHARDED_IO)
    _SHARDED_IO.update(scope=scope, collect=collect, loaded=loaded, convert=convert)
    try:
        yield
    finally:
        _SHARDED_IO.update(previous)


def _split(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if is_dtensor(state) and _SHARDED_IO["collect"] is not None:
        key = f"{_SHARDED_IO['scope']}/{prefix}"
        _SHARDED_IO["collect"][key] = state.detach()
        return {_SHARDED_MARK: key}
    if is_dtensor(state):
        # One rank holds only its shard: writing it would store part of the tensor as if it were whole.
        raise TypeError(
            f"State value at '{prefix}' is sharded across processes (an FSDP2 DTensor of shape {tuple(state.shape)}): "
            "strategy state of a sharded model cannot be written by one rank into the continual checkpoint yet. "
            "Train without mid-task and end-of-task continual checkpoints (save_strategy='no', "
            "save_continual_state=False) under FSDP2; see docs/distributed.md."
        )
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous()
        return {_TENSOR_MARK: prefix}
    if isinstance(state, dict):
        for key in state:
            if not isinstance(key, str) or "/" in key:
                raise ValueError(f"State keys must be strings without '/', got {key!r} under '{prefix}'.")
        return {k: _split(v, f"{prefix}/{k}" if prefix else k, tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"State value at '{prefix}' has type {type(state).__name__}; only tensors and JSON values persist.")


def _merge(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_MARK}:
            convert = _SHARDED_IO["convert"]
            tensor = tensors[obj[_TENSOR_MARK]]
            return convert(obj[_TENSOR_MARK], tensor) if convert is not None else tensor
        if set(obj) == {_SHARDED_MARK}:
            loaded = _SHARDED_IO["loaded"]
            if loaded is None or obj[_SHARDED_MARK] not in loaded:
                raise ValueError(f"The strategy state names the sharded tensor {obj[_SHARDED_MARK]!r}, which is not in "
                                 "the checkpoint's torch.distributed.checkpoint folder (dcp/): the checkpoint is "
                                 "incomplete, or it is read without clm_hf.state.load_continual_tensors.")
            return loaded[obj[_SHARDED_MARK]]
        return {k: _merge(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_merge(v, tensors) for v in obj]
    return obj


def save_tensor_json_state(state: dict[str, Any], directory: str | os.PathLike) -> None:
    """Persist a nested dict of tensors and JSON values as ``state.safetensors`` + ``state.json``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    if tensors:
        save_file(tensors, os.path.join(directory, _TENSORS_FILE))
    with open(os.path.join(directory, _JSON_FILE), "w") as handle:
        json.dump(skeleton, handle, indent=1, allow_nan=False)


def load_tensor_json_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Inverse of :func:`save_tensor_json_state`."""
    from safetensors.torch import load_file

    json_path = os.path.join(directory, _JSON_FILE)
    if not os.path.exists(json_path):
        return {}
    with open(json_path) as handle:
        skeleton = json.load(handle)
    tensor_path = os.path.join(directory, _TENSORS_FILE)
    tensors = load_file(tensor_path) if os.path.exists(tensor_path) else {}
    return _merge(skeleton, tensors)
