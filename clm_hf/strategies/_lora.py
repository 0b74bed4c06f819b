"""LoRA plumbing shared by the strategies that give every task its own PEFT adapter (PNN's lora
mode, O-LoRA): the adapter config, which adapter trains, and a temporary switch of adapters."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

from torch import nn

from .base import unwrap_model


def lora_config(model: nn.Module, config: Any):
    """A ``peft.LoraConfig`` from a strategy config's ``lora_rank``/``lora_alpha``/``lora_dropout``/
    ``lora_target_modules``, with the task type of ``model`` (seq2seq or causal)."""
    from peft import LoraConfig, TaskType

    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
    )


def train_only(model: nn.Module, adapter: str) -> None:
    """Only ``adapter``'s weights train: the base model and every other adapter are frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(f".{adapter}." in name)


@contextlib.contextmanager
def adapters_active(model: nn.Module, active: list[str]) -> Iterator[nn.Module]:
    """Run with exactly the ``active`` adapters of a ``PeftModel`` in the forward pass (summed),
    then restore the previous adapters and every ``requires_grad`` flag (PEFT changes both)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    previous = list(model.base_model.active_adapters)
    model.base_model.set_adapter(list(active))
    try:
        yield model
    finally:
        model.base_model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def merged_copy(model: nn.Module, adapters: list[str]) -> nn.Module:
    """A copy of the base model of the ``PeftModel`` ``model`` with the LoRA ``adapters`` merged into its
    weights (``W + Σ B A · scaling``): a plain Hugging Face model that ``from_pretrained`` loads.

    ``model`` itself is left as it is (PEFT's ``merge_and_unload`` merges in place, and unmerging
    later would not give the exact weights back), at the cost of a second copy in memory while it is built.
    """
    twin = copy.deepcopy(model)
    return twin.merge_and_unload(adapter_names=list(adapters))


def is_peft(model: Any) -> bool:
    """Whether ``model`` (unwrapped from DDP/accelerate first) is a PEFT model.

    >>> from torch import nn
    >>> is_peft(nn.Linear(2, 2))
    False
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(unwrap_model(model), PeftModel)
