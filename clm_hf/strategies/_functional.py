"""The model as a pure function of its trainable weights, for ``torch.func`` transforms.

Shared by EWC (per-row gradients for the Fisher) and GEM (one gradient per past task): both
``vmap`` a ``grad`` of a loss computed through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .base import unwrap_model


class FunctionalModel:
    """Call a model with its trainable weights given as an argument, the rest held fixed.

    Args:
        model (`nn.Module`): The model (a DDP wrapper is looked through).
        params (`dict[str, nn.Parameter]`): The trainable parameters by name, as in
            ``model.named_parameters()``; every other parameter and buffer is passed detached.

    Call it as ``fm(weights, **inputs)`` with ``weights`` a dict like :meth:`detached`'s; the
    frozen tensors share storage with the live ones, so later in-place updates are seen.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.model = unwrap_model(model)
        self.params = params
        self.frozen = {n: t.detach() for n, t in self.model.named_parameters() if n not in params}
        self.frozen.update(dict(self.model.named_buffers()))

    def detached(self) -> dict[str, torch.Tensor]:
        """The trainable weights, detached (the point ``grad`` differentiates at)."""
        return {n: p.detach() for n, p in self.params.items()}

    def __call__(self, weights: dict[str, torch.Tensor], **inputs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.model, {**self.frozen, **weights}, args=(), kwargs=inputs)


@contextlib.contextmanager
def no_padding_warning(model: nn.Module) -> Iterator[None]:
    """Silence HF's "padding without an attention mask" check inside the block.

    HF models look for pad tokens to warn about a missing attention mask; that lookup is a
    data-dependent branch ``vmap`` rejects. Callers pass no mask only where it changes nothing
    (unpadded rows, or right-padded rows of a causal LM).
    """
    name = "warn_if_padding_and_no_attention_mask"
    patched = [(m, m.__dict__.get(name)) for m in model.modules() if hasattr(m, name)]
    for module, _ in patched:
        setattr(module, name, _silent)
    try:
        yield
    finally:  # restore what was there, so that nested blocks unwind cleanly
        for module, previous in patched:
            if previous is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, previous)


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def batchable_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` with its math backend inside the block.

    The fused kernels (CPU flash, cuDNN, flash and memory-efficient attention on CUDA) have no
    ``vmap`` batching rule, so under ``vmap`` PyTorch loops over the batched dimension, one kernel
    call per group or row (seen on an H200: GEM's reference pass 5.5x a plain step instead of
    ~2x). The math backend is made of ordinary batched matrix products and softmax, which vmap
    batches. The result is the same attention, up to float rounding.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
