"""Progressive Neural Networks (Rusu et al. 2016, https://arxiv.org/abs/1606.04671).

PNN never changes what it learned: every task gets new parameters, the parameters of earlier
tasks are frozen, and evaluation of a task runs the parameters of that task. Forgetting is zero by
construction; the price is parameter growth, reported after every task.

- ``mode="columns"`` is the paper's method. Task ``t`` gets column ``t``, a whole copy of the
  model, plus lateral adapters that feed the block outputs of every earlier column into it (see
  :mod:`clm_hf.strategies.pnn_model`). A new column starts as a copy of the newest column
  (``column_init="copy"``), not randomly as in the paper: for a pretrained language model a random
  column would throw the pretraining away, and the copy gives forward transfer from the start;
  the laterals' output projections start at zero, so the new column's first forward equals the
  copy's. ``column_init="fresh"`` builds random columns, as in the paper. Memory grows by one
  model per task, and training task ``t`` runs ``t`` frozen columns forward.
- ``mode="lora"`` is the scalable form for large models: a frozen base model with one PEFT LoRA
  adapter per task. Only the newest adapter trains; evaluating a task switches to its adapter.
  There are no lateral connections; forward transfer comes from initialising each adapter as a
  copy of the previous one (``column_init="copy"``; ``"fresh"`` starts from PEFT's zero-output
  init, i.e. the bare base model). Growth is one adapter per task.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..sharding import shard_plain_modules
from ._lora import adapters_active, lora_config, merged_copy, train_only
from .base import Strategy, StrategyConfig, TaskInfo, check_range, register_strategy, unwrap_model
from .pnn_model import ACTIVATIONS, ProgressiveModel

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import ContinualTrainer

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "pnn_task_"


@dataclass
class PNNConfig(StrategyConfig):
    """Settings of :class:`PNN`.

    Args:
        mode (`str`): ``"columns"`` (a frozen copy of the model per task plus lateral adapters,
            the paper's method) or ``"lora"`` (a frozen base model and one LoRA adapter per task).
        lateral_rank (`int`): Bottleneck width of each lateral adapter (columns mode).
        lateral_activation (`str`): Non-linearity of the lateral adapters: ``"gelu"``, ``"relu"``
            (the paper's), ``"silu"``, ``"tanh"`` or ``"identity"``.
        column_init (`str`): ``"copy"``: a new column (adapter) starts as a copy of the newest one;
            ``"fresh"``: random weights for a column (as in the paper), PEFT's default init for an
            adapter.
        lora_rank (`int`): LoRA rank ``r`` (lora mode).
        lora_alpha (`float`): LoRA scaling ``alpha`` (lora mode).
        lora_dropout (`float`): Dropout on the LoRA input, in [0, 1) (lora mode).
        lora_target_modules (`list[str]` or `str`, *optional*): Modules LoRA wraps; ``None`` uses
            PEFT's default for the architecture (e.g. ``c_attn`` for GPT-2, ``q_proj``/``v_proj`` for
            Llama, ``q``/``v`` for T5).

    Example:

    >>> from clm_hf.strategies.pnn import PNNConfig
    >>> config = PNNConfig(mode="lora", lora_rank=4)
    >>> config.mode, config.lora_rank
    ('lora', 4)
    """

    aliases = {"rank": "lateral_rank", "lora_r": "lora_rank", "init": "column_init", "activation": "lateral_activation"}

    mode: str = field(default="columns", metadata={"help": "'columns' (PNN columns + laterals) or 'lora' (one LoRA adapter per task)."})
    lateral_rank: int = field(default=32, metadata={"help": "Bottleneck width of each lateral adapter (columns mode)."})
    lateral_activation: str = field(default="gelu", metadata={"help": "Non-linearity of the lateral adapters."})
    column_init: str = field(default="copy", metadata={"help": "'copy' the newest column/adapter, or 'fresh' weights."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (lora mode)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (lora mode)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1) (lora mode)."})
    lora_target_modules: Any = field(default=None, metadata={"help": "Modules LoRA wraps; None = PEFT's default."})

    def validate(self) -> None:
        if self.mode not in ("columns", "lora"):
            raise ValueError(f"PNN mode must be 'columns' or 'lora', got {self.mode!r}.")
        check_range("lateral_rank", self.lateral_rank, low=1)
        if self.lateral_activation not in ACTIVATIONS:
            raise ValueError(f"lateral_activation must be one of {sorted(ACTIVATIONS)}, got {self.lateral_activation!r}.")
        if self.column_init not in ("copy", "fresh"):
            raise ValueError(f"column_init must be 'copy' or 'fresh', got {self.column_init!r}.")
        check_range("lora_rank", self.lora_rank, low=1)
        check_range("lora_alpha", self.lora_alpha, low=0.0, low_inclusive=False)
        check_range("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_inclusive=False)
        targets = self.lora_target_modules
        if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)
        ):
            raise ValueError(f"lora_target_modules must be None, a string or a list of strings, got {targets!r}.")
        if isinstance(targets, tuple):
            self.lora_target_modules = list(targets)


@register_strategy
class PNN(Strategy):
    """Progressive Neural Networks: new parameters per task, old ones frozen, zero forgetting.

    In ``columns`` mode the trainer's model becomes a
    :class:`~clm_hf.strategies.pnn_model.ProgressiveModel` (same forward as the HF model, with
    ``.config``); in ``lora`` mode a PEFT ``PeftModel`` with one adapter per task. Outside
    ``trainer.use_task`` the newest column (adapter) answers; ``use_task(t)`` routes through the
    column (adapter) of task ``t``. Parameter counts after each task are in
    :meth:`parameter_growth` and in ``trainer.results.metadata["pnn_parameters"]``.

    Args:
        config ([`PNNConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf.strategies.pnn import PNN
    >>> pnn = PNN(mode="columns", lateral_rank=16)
    >>> pnn.config.lateral_rank, pnn.parameter_growth()
    (16, [])

    Reference: Rusu et al., *Progressive Neural Networks*, 2016, https://arxiv.org/abs/1606.04671.
    """

    name = "pnn"
    # FSDP2: each new column (its blocks, the rest, its laterals) or adapter is sharded as it is added.
    supports_fsdp = True
    supports_streaming = True  # acts on the model only, never re-reads the task's rows
    config_class = PNNConfig

    def __init__(self, config: PNNConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.task_ids: list[str] = []  # column (adapter) i belongs to task task_ids[i]
        self.growth: list[dict[str, Any]] = []
        self.base_parameters: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def setup(self, trainer: ContinualTrainer) -> None:
        super().setup(trainer)
        if self.config.mode == "columns" and _fsdp_version(trainer) == 1:
            raise NotImplementedError(
                "Strategy 'pnn' with mode='columns' is not supported on FSDP1: FSDP1 flattens the wrapped model's "
                "parameters, so a column added for a later task cannot join it; use FSDP2 (fsdp_version: 2), "
                "mode='lora' or DDP."
            )
        if self.config.mode == "lora":
            try:
                import peft  # noqa: F401
            except ImportError as err:  # pragma: no cover - peft is a dependency
                raise ImportError("PNN(mode='lora') needs the `peft` package: pip install peft.") from err

    def torch_compile_problem(self) -> str | None:
        if self.config.mode != "columns":
            return None
        # Measured (benchmarks/compat_matrix.py): after another GPT-2 was compiled in the same
        # process, the second column's laterals never trained (weights off by two Adam steps).
        return ("mode='columns' adds its lateral connections as forward hooks, which torch.compile does not "
                "guard on, so a block graph compiled without them can be silently reused; use mode='lora' or "
                "torch_compile=False")

    def generation_problem(self, model: nn.Module) -> str | None:
        config = getattr(unwrap_model(model), "config", None) if model is not None else None
        if self.config.mode != "columns" or not getattr(config, "is_encoder_decoder", False):
            return None
        return ("mode='columns' generates through its lateral connections for causal LMs only, and a seq2seq "
                "model's columns after the first could not generate; use mode='lora' to generate with a seq2seq model")

    def export_model(self, model: nn.Module, task: TaskInfo | None) -> nn.Module:
        """lora mode: the base model with ``task``'s adapter merged in; columns mode: refused.

        Each task has its own column (adapter), so an export is for one task; the columns of the
        paper's method, joined by laterals, are no Hugging Face model at all.
        """
        if self.config.mode == "columns":
            raise ValueError(
                "PNN(mode='columns') has no from_pretrained form to export: its model is a ProgressiveModel, one "
                "column per task joined by lateral adapters. Keep the continual checkpoint instead "
                "(trainer.save_continual_checkpoint(folder), or <output_dir>/continual/task-XXX) and rebuild it with "
                "ContinualCausalLMTrainer.from_pretrained(run_dir) (ContinualSeq2SeqTrainer for seq2seq), then "
                "trainer.use_task(task_id); or train with PNN(mode='lora'), whose export merges one task's adapter."
            )
        if task is None:
            raise ValueError(
                f"PNN(mode='lora') has one adapter per task ({self.task_ids}): say which one to merge into the exported "
                "model with trainer.export_model(folder, task=task_id). To keep every adapter, save the continual "
                "checkpoint (trainer.save_continual_checkpoint(folder)) and rebuild it with "
                "ContinualCausalLMTrainer.from_pretrained(run_dir)."
            )
        return merged_copy(model, [adapter_name(self.column_of(task))])

    def prepare_model(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        model = unwrap_model(model)
        if self.base_parameters is None:
            self.base_parameters = _count(model)["total"]
        del self.task_ids[task.index:]  # a mid-task resume re-prepares the task in progress
        self.task_ids.append(task.task_id)
        return self._grow(model, len(self.task_ids))

    def _grow(self, model: nn.Module, columns: int) -> nn.Module:
        if self.config.mode == "lora":
            return _grow_lora(model, columns, self.config)
        if not isinstance(model, ProgressiveModel):
            model = ProgressiveModel(model, lateral_rank=self.config.lateral_rank,
                                     activation=self.config.lateral_activation, column_init=self.config.column_init)
        while model.num_columns < columns:
            model.add_column()
        model.active_column = None
        return model

    def restore_model(self, model: nn.Module) -> nn.Module:
        """Rebuild as many columns (adapters) as the saved state had, before the weights load."""
        if not self.task_ids:
            return model
        return self._grow(unwrap_model(model), len(self.task_ids))

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        counts = _count(unwrap_model(trainer.model))
        previous = self.growth[task.index - 1]["total"] if 0 < task.index <= len(self.growth) else self.base_parameters
        entry = {
            "task": task.name, "task_id": task.task_id, "columns": task.index + 1,
            "total": counts["total"], "trainable": counts["trainable"],
            "added": counts["total"] - (previous if previous is not None else counts["total"]),
        }
        self.growth = self.growth[: task.index] + [entry]
        logger.info("PNN after task '%s': %d parameters in total (%d trained for it, %d added).",
                    task.name, entry["total"], entry["trainable"], entry["added"])
        if trainer.results is not None:
            trainer.results.metadata["pnn_parameters"] = [dict(e) for e in self.growth]

    def parameter_growth(self) -> list[dict[str, Any]]:
        """Parameter counts after each finished task.

        Returns:
            `list[dict]`: One entry per task: ``task``, ``task_id``, ``columns``, ``total`` (unique
            parameters of the whole model), ``trainable`` (those trained for that task: its column
            and laterals, or its adapter) and ``added`` (growth over the previous task).
        """
        return [dict(e) for e in self.growth]

    # --- routing -------------------------------------------------------------------------------
    def column_of(self, task: TaskInfo) -> int:
        """Index of the column (adapter) that learned ``task``."""
        if task.task_id not in self.task_ids:
            raise KeyError(f"PNN has no column for task '{task.task_id}'; columns belong to {self.task_ids}.")
        return self.task_ids.index(task.task_id)

    def use_task(self, model: nn.Module, task: TaskInfo) -> contextlib.AbstractContextManager:
        model = unwrap_model(model)
        index = self.column_of(task)
        if self.config.mode == "lora":
            return _use_adapter(model, adapter_name(index))
        if not isinstance(model, ProgressiveModel):
            raise TypeError(f"PNN.use_task expects the ProgressiveModel it built, got {type(model).__name__}.")
        return model.use_column(index)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"task_ids": list(self.task_ids), "growth": [dict(e) for e in self.growth],
                "base_parameters": self.base_parameters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_ids = list(state.get("task_ids", []))
        self.growth = [dict(e) for e in state.get("growth", [])]
        self.base_parameters = state.get("base_parameters")


def _fsdp_version(trainer: Any) -> int | None:
    """The FSDP version the trainer runs (1 or 2), or ``None`` without FSDP."""
    from accelerate.utils import DistributedType

    accelerator = getattr(trainer, "accelerator", None)
    backend = getattr(accelerator, "distributed_type", None)
    if backend != DistributedType.FSDP and not getattr(trainer, "is_fsdp_enabled", False):
        return None
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None)
    return int(version) if version is not None else None


def _count(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())  # unique: tied weights count once
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


# --- lora mode --------------------------------------------------------------------------------------
def adapter_name(index: int) -> str:
    """PEFT adapter name of task ``index`` in lora mode."""
    return f"{ADAPTER_PREFIX}{index}"


def _grow_lora(model: nn.Module, adapters: int, config: PNNConfig) -> nn.Module:
    """Wrap ``model`` in PEFT if needed and add adapters up to ``adapters``; the newest trains."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        foreign = [n for n in model.peft_config if not n.startswith(ADAPTER_PREFIX)]
        if foreign:
            raise ValueError(f"PNN(mode='lora') adds its own LoRA adapters; pass the base model, not a PeftModel "
                             f"with adapter(s) {foreign}.")
    else:
        model = get_peft_model(model, lora_config(model, config), adapter_name=adapter_name(0))
    for index in range(len(model.peft_config), adapters):
        name = adapter_name(index)
        model.add_adapter(name, lora_config(model.get_base_model(), config))
        # Under FSDP2 (a later task: the model is already sharded) the new adapter's modules are
        # plain: shard them like the rest of the model, before the task's optimizer is built.
        shard_plain_modules(model)
        if config.column_init == "copy":
            _copy_adapter(model, adapter_name(index - 1), name)
    _activate_newest(model)
    return model


def _copy_adapter(model: nn.Module, source: str, target: str) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if f".{source}." in name:
                twin = params.get(name.replace(f".{source}.", f".{target}."))
                if twin is not None:
                    twin.copy_(p)


def _activate_newest(model: nn.Module) -> None:
    newest = adapter_name(len(model.peft_config) - 1)
    model.set_adapter(newest)
    train_only(model, newest)  # the base and every older adapter stay frozen


def _use_adapter(model: nn.Module, name: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"PNN(mode='lora').use_task expects the PeftModel it built, got {type(model).__name__}.")
    if name not in model.peft_config:
        raise KeyError(f"The model has no adapter '{name}' (adapters: {list(model.peft_config)}).")
    return adapters_active(model, [name])
