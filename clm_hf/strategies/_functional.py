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
            ``model.named_parameters()``; every other parameter and buffer is left in place.

    Call it as ``fm(weights, **inputs)`` with ``weights`` a dict like :meth:`detached`'s; the
    frozen tensors are the live ones, so later in-place updates are seen.

    The weights are swapped into the modules' parameter slots for the duration of the call and
    put back afterwards (also on error). The slots, including every alias of a tied weight, are
    found once here: ``torch.func.functional_call`` walks every module and validates every name
    on every call, which on a small model cost as much as a tenth of a forward pass (GEM's
    reference pass and LwF's teacher call run it at every step). A model with parametrized
    modules (``torch.nn.utils.parametrize``) goes through ``functional_call``, which handles them.

    Example:

    >>> import torch
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> model = build_tiny_model("gpt2", build_tokenizer())
    >>> params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    >>> fm = FunctionalModel(model, params)
    >>> zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> float(fm(zeros, input_ids=ids).logits.abs().max())  # every trainable weight swapped for 0
    0.0
    >>> bool(model(input_ids=ids).logits.abs().max() > 0)  # and put back afterwards
    True
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.model = unwrap_model(model)
        self.params = params
        self.frozen = {n: t.detach() for n, t in self.model.named_parameters() if n not in params}
        self.frozen.update(dict(self.model.named_buffers()))
        # (module, attribute, name in ``params``) of every slot holding a trainable parameter:
        # a tied weight (GPT-2's embedding and LM head) has several slots and one name.
        names = {id(p): n for n, p in params.items()}
        self._slots: list[tuple[nn.Module, str, str]] = [
            (module, attr, names[id(value)])
            for module in self.model.modules()
            for attr, value in module._parameters.items()  # noqa: SLF001 - the slots functional_call swaps too
            if value is not None and id(value) in names
        ]
        self._generic = any(hasattr(m, "parametrizations") for m in self.model.modules())

    def detached(self) -> dict[str, torch.Tensor]:
        """The trainable weights, detached (the point ``grad`` differentiates at)."""
        return {n: p.detach() for n, p in self.params.items()}

    def __call__(self, weights: dict[str, torch.Tensor], **inputs: Any) -> Any:
        if self._generic:
            from torch.func import functional_call

            return functional_call(self.model, {**self.frozen, **weights}, args=(), kwargs=inputs)
        with swapped(self._slots, weights):
            return self.model(**inputs)


@contextlib.contextmanager
def swapped(slots: list[tuple[nn.Module, str, str]], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Put ``weights[name]`` into every ``(module, attribute, name)`` parameter slot inside the block.

    The live parameters are restored afterwards, even on error; they are never written to, so
    an autograd graph that holds them stays valid.
    """
    saved = []
    try:
        for module, attr, name in slots:
            saved.append((module, attr, module._parameters[attr]))  # noqa: SLF001
            module._parameters[attr] = weights[name]  # noqa: SLF001
        yield
    finally:
        for module, attr, value in reversed(saved):
            module._parameters[attr] = value  # noqa: SLF001


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
