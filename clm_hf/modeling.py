"""Model helpers shared by the trainer, the evaluation and the strategies.

This module sits low in the package (it imports only torch), so that :mod:`clm_hf.evaluation`,
:mod:`clm_hf.hub` and every strategy can use it without importing one another.

>>> import torch
>>> from clm_hf.modeling import eval_mode, unwrap_model
>>> layer = torch.nn.Linear(2, 2)
>>> with eval_mode(unwrap_model(layer)):
...     layer.training
False
>>> layer.training
True
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["decoder_inputs", "eval_mode", "is_seq2seq", "trainable_parameters", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/``torch.compile`` wrappers so state is keyed on the bare model's names."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters that receive gradients (adapter weights only, for a PEFT model)."""
    return {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with dropout off, restoring the previous train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoder models, looking through DDP and PEFT wrappers."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def decoder_inputs(model: nn.Module, batch: dict[str, torch.Tensor], seq2seq: bool) -> dict[str, torch.Tensor]:
    """The shifted ``decoder_input_ids`` a seq2seq model needs for ``batch``; ``{}`` otherwise.

    Seq2seq models build decoder inputs from labels; passing labels would also compute a loss
    that scoring does not use, so the shifted decoder inputs are built explicitly instead.
    """
    if not seq2seq or "decoder_input_ids" in batch:
        return {}
    base = unwrap_model(model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return {"decoder_input_ids": base.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}
