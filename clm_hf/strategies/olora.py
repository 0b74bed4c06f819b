"""O-LoRA: orthogonal subspace learning for language-model continual learning (Wang et al. 2023,
https://arxiv.org/abs/2310.14152).

Every task gets a new LoRA adapter on a frozen base model; the adapters of earlier tasks are frozen
and stay in the forward pass, so the model computes ``W x + Σ_k B_k A_k x`` (all adapters summed;
no task identity is needed at inference). While task ``t`` trains, a penalty keeps the rows of the
new ``A_t`` (the input directions the new adapter reads) orthogonal to those of every older ``A_k``:

    λ1 · Σ_modules Σ_{k<t} Σ_ij |(A_k A_tᵀ)_ij|   (+ λ2 · Σ ||A_t||² + ||B_t||², optional)

If ``A_k A_tᵀ = 0`` the new adapter ignores the inputs the old ones read, so what it learns adds
nothing along the old tasks' input subspaces. The penalty acts on ``A`` only, as in the paper.

Where the LoRA adapters come from:

- a plain Hugging Face model is wrapped with PEFT, one adapter ``olora_task_<i>`` per task, built
  from the ``lora_*`` options;
- a ``PeftModel`` with exactly one LoRA adapter keeps it as the first task's adapter, and every later
  adapter copies its ``LoraConfig`` (rank, targets, alpha, dropout); the ``lora_*`` options are
  then unused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..sharding import is_dtensor, reshard, shard_plain_modules
from ._lora import adapters_active, is_peft, lora_config, merged_copy, train_only
from .base import Strategy, StrategyConfig, TaskInfo, check_range, register_strategy, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import ContinualTrainer

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "olora_task_"


@dataclass
class OLoRAConfig(StrategyConfig):
    """Settings of :class:`OLoRA`.

    Args:
        lambda_orth (`float`): λ1, weight of the orthogonality penalty Σ |A_old A_newᵀ| (0.5 in
            the paper).
        lambda_l2 (`float`): λ2, weight of an L2 penalty (sum of squares) on the new adapter's
            ``A`` and ``B``; 0 turns it off.
        lora_rank (`int`): LoRA rank ``r`` of every adapter (8 in the paper).
        lora_alpha (`float`): LoRA scaling ``alpha``.
        lora_dropout (`float`): Dropout on the LoRA input, in [0, 1).
        lora_target_modules (`list[str]` or `str`, *optional*): Modules LoRA wraps; ``None`` uses
            PEFT's default for the architecture (``q_proj``/``v_proj`` for Llama and Qwen, ``q``/``v``
            for T5, ``c_attn`` for GPT-2).
        use_task (`bool`): Evaluate task ``t`` with adapters ``0..t`` only, i.e. the model exactly
            as task ``t`` left it (needs the task identity at inference, unlike the paper's
            method). ``False`` (the paper's setting) scores every task with all adapters.

    Example:

    >>> from clm_hf.strategies.olora import OLoRAConfig
    >>> config = OLoRAConfig(lora_rank=4, lambda_orth=0.5)
    >>> config.lora_rank, config.use_task
    (4, False)
    """

    aliases = {"lambda_1": "lambda_orth", "lamda_1": "lambda_orth", "lambda_2": "lambda_l2", "lamda_2": "lambda_l2",
               "lora_r": "lora_rank", "rank": "lora_rank"}

    lambda_orth: float = field(default=0.5, metadata={"help": "λ1: weight of Σ |A_old A_newᵀ|."})
    lambda_l2: float = field(default=0.0, metadata={"help": "λ2: weight of an L2 penalty on the new adapter (0 = off)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r of every task's adapter."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_target_modules: Any = field(default=None, metadata={"help": "Modules LoRA wraps; None = PEFT's default."})
    use_task: bool = field(default=False, metadata={"help": "Score task t with adapters 0..t only (task-aware)."})

    def validate(self) -> None:
        check_range("lambda_orth", self.lambda_orth, low=0.0)
        check_range("lambda_l2", self.lambda_l2, low=0.0)
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
        if not isinstance(self.use_task, bool):
            raise ValueError(f"use_task must be a bool, got {self.use_task!r}.")


@register_strategy
class OLoRA(Strategy):
    """O-LoRA: one LoRA adapter per task, old adapters frozen and summed in, new ``A`` kept orthogonal to old ones.

    The penalty is logged as ``olora_orthogonality`` (and ``olora_l2`` when ``lambda_l2 > 0``).
    Only the newest adapter trains; the base model and older adapters never change. Growth is one
    adapter per task (``r · (d_in + d_out)`` per wrapped module).

    Args:
        config ([`OLoRAConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf.strategies.olora import OLoRA
    >>> olora = OLoRA(lambda_orth=0.5, lora_rank=8)
    >>> olora.config.lambda_orth, olora.adapter_names
    (0.5, [])

    Reference: Wang et al., *Orthogonal Subspace Learning for Language Model Continual Learning*,
    EMNLP Findings 2023, https://arxiv.org/abs/2310.14152.
    """

    name = "olora"
    # Under FSDP2 each new adapter is sharded as it is added, and the penalty is a DTensor
    # computation over the shards, gathered into one scalar.
    supports_fsdp = True
    supports_streaming = True  # acts on the model only, never re-reads the task's rows
    config_class = OLoRAConfig

    def __init__(self, config: OLoRAConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.adapter_names: list[str] = []  # adapter i belongs to task task_ids[i]
        self.task_ids: list[str] = []
        # (A of the newest adapter, detached A of every older adapter) per wrapped module.
        self._pairs: list[tuple[nn.Parameter, list[torch.Tensor]]] = []
        self._new: list[nn.Parameter] = []

    def setup(self, trainer: ContinualTrainer) -> None:
        super().setup(trainer)
        try:
            import peft  # noqa: F401
        except ImportError as err:  # pragma: no cover - peft is a dependency
            raise ImportError("O-LoRA needs the `peft` package: pip install peft.") from err

    # --- adapters -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        model = unwrap_model(model)
        del self.task_ids[task.index:]  # a mid-task resume re-prepares the task in progress
        del self.adapter_names[task.index + 1:]
        self.task_ids.append(task.task_id)
        return self._grow(model, task.index + 1)

    def restore_model(self, model: nn.Module) -> nn.Module:
        """Rebuild the saved adapters (before the checkpoint's weights load into them)."""
        if not self.task_ids:
            return model
        return self._grow(unwrap_model(model), len(self.task_ids))

    def _grow(self, model: nn.Module, count: int) -> nn.Module:
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            lora = [n for n, c in model.peft_config.items() if type(c).__name__ == "LoraConfig"]
            if len(lora) != len(model.peft_config):
                raise ValueError(f"O-LoRA needs LoRA adapters; the PeftModel has {sorted(model.peft_config)} "
                                 f"of types {sorted({type(c).__name__ for c in model.peft_config.values()})}.")
            if not self.adapter_names:
                if len(lora) != 1:
                    raise ValueError(
                        f"O-LoRA adds one adapter per task; pass the base model or a PeftModel with one LoRA adapter "
                        f"(the first task's), not {len(lora)} ({sorted(lora)})."
                    )
                self.adapter_names = [lora[0]]
                logger.info("O-LoRA: the PeftModel's adapter '%s' is the first task's; later adapters copy its config.",
                            lora[0])
            # Only the first adapter must pre-exist: later ones are rebuilt below (a mid-task resume can
            # follow an end-of-task restore that built fewer adapters than the mid-task state names).
            missing = [n for n in self.adapter_names[:1] if n not in model.peft_config]
            if missing:
                raise ValueError(f"The model lacks O-LoRA's adapter(s) {missing} (it has {sorted(model.peft_config)}). "
                                 "Resume with the model the run started from.")
        else:
            first = self.adapter_names[0] if self.adapter_names else adapter_name(0)
            if first != adapter_name(0):
                raise ValueError(f"This O-LoRA state started from a PeftModel whose adapter is '{first}': "
                                 "wrap the base model the same way before resuming.")
            model = get_peft_model(model, lora_config(model, self.config), adapter_name=first)
            self.adapter_names = [first]
        template = model.peft_config[self.adapter_names[0]]
        for name in self.adapter_names[1:count]:
            if name not in model.peft_config:
                model.add_adapter(name, copy.deepcopy(template))
        while len(self.adapter_names) < count:
            name = adapter_name(len(self.adapter_names))
            if name not in model.peft_config:
                model.add_adapter(name, copy.deepcopy(template))
            self.adapter_names.append(name)
        # Under FSDP2 (a later task: the model is already sharded) the new adapter's modules are
        # plain: shard them like the rest of the model before the task's optimizer is built.
        shard_plain_modules(model)
        _activate(model, self.adapter_names[:count], trainable=self.adapter_names[count - 1])
        return model

    # --- penalty --------------------------------------------------------------------------------
    def before_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        self._bind(trainer.model, task.index)

    def _bind(self, model: nn.Module, index: int) -> None:
        """Pair each module's new ``A`` with the frozen ``A`` of every older adapter (once per task)."""
        # After an evaluation FSDP2 may hold unsharded copies in the parameters' places: bind the
        # sharded parameters themselves (DTensors), which the optimizer steps.
        bare = reshard(unwrap_model(model))
        names = self.adapter_names[: index + 1]
        newest = names[-1]
        self._pairs, self._new = [], []
        for module in bare.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, nn.ModuleDict) or newest not in lora_a:
                continue
            new_a = lora_a[newest].weight
            # Frozen: gathered whole once per task under FSDP2 (an A is r x d, small).
            olds = [_whole(lora_a[n].weight.detach()) for n in names[:-1] if n in lora_a]
            self._pairs.append((new_a, olds))
            self._new.append(new_a)
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, nn.ModuleDict) and newest in lora_b:
                self._new.append(lora_b[newest].weight)

    def orthogonality(self) -> torch.Tensor:
        """Σ_modules Σ_old Σ |A_old A_newᵀ| (0 on the first task), differentiable in ``A_new``.

        Under FSDP2 the ``A`` are DTensor shards: the new ``A`` is gathered whole (``r x d``, small)
        differentiably, so every rank computes the same scalar and the gradient of the new ``A``
        lands in its shard (a product of shards would leave it as an unreduced partial sum)."""
        total = None
        for new_a, olds in self._pairs:
            new = _whole(new_a).float() if olds else None
            for old_a in olds:
                term = (old_a.float() @ new.T).abs().sum()
                total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def loss(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.config.lambda_orth > 0 and any(olds for _, olds in self._pairs):
            terms["olora_orthogonality"] = self.config.lambda_orth * self.orthogonality()
        if self.config.lambda_l2 > 0 and self._new:
            terms["olora_l2"] = self.config.lambda_l2 * sum(_whole(p).float().square().sum() for p in self._new)
        return terms

    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        if self._pairs and any(olds for _, olds in self._pairs):
            logger.info("O-LoRA after task '%s': Σ|A_old A_newᵀ| = %.4g", task.name, float(self.orthogonality().detach()))
        self._pairs, self._new = [], []

    # --- evaluation -------------------------------------------------------------------------------
    def use_task(self, model: nn.Module, task: TaskInfo) -> contextlib.AbstractContextManager:
        if not self.config.use_task:
            return contextlib.nullcontext()
        if task.task_id not in self.task_ids:
            raise KeyError(f"O-LoRA has no adapter for task '{task.task_id}'; adapters belong to {self.task_ids}.")
        return adapters_active(unwrap_model(model), self.adapter_names[: self.task_ids.index(task.task_id) + 1])

    def export_model(self, model: nn.Module, task: TaskInfo | None) -> nn.Module:
        """The base model with every task's adapter merged in, since all of them answer at inference.

        With ``use_task=True`` and a task, the adapters ``0..t`` that score task ``t`` are merged.
        """
        names = self.adapter_names
        if task is not None and self.config.use_task:
            names = names[: self.task_ids.index(task.task_id) + 1]
        if not names or not is_peft(model):
            return model
        return merged_copy(model, names)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"task_ids": list(self.task_ids), "adapter_names": list(self.adapter_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_ids = list(state.get("task_ids", []))
        self.adapter_names = list(state.get("adapter_names", []))
        self._pairs, self._new = [], []


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard) gathered into the whole plain tensor, differentiably (its gradient
    goes back to each rank's shard); a plain tensor as it is."""
    return value.full_tensor() if is_dtensor(value) else value


def adapter_name(index: int) -> str:
    """PEFT adapter name O-LoRA gives task ``index`` (when it wraps the model itself)."""
    return f"{ADAPTER_PREFIX}{index}"


def _activate(model: nn.Module, active: list[str], *, trainable: str) -> None:
    """All ``active`` adapters in the forward pass (summed); only ``trainable``'s weights train."""
    model.base_model.set_adapter(list(active))
    train_only(model, trainable)
