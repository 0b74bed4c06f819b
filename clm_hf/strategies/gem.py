"""Gradient Episodic Memory (GEM, Lopez-Paz & Ranzato 2017, https://arxiv.org/abs/1706.08840) and
Averaged GEM (A-GEM, Chaudhry et al. 2019, https://arxiv.org/abs/1812.00420).

Both keep an *episodic memory*: after each task, ``memory_per_task`` of its training rows. While a
later task trains, the gradient ``g`` the optimizer is about to use is compared with gradients of
the loss on the memory, and edited so that, to first order, the step does not raise that loss:

- **GEM** computes one reference gradient ``g_k`` per past task (the rows ``G``, ``K x P``). If some
  ``g · g_k < 0`` it replaces ``g`` by the closest ``g̃`` with ``G g̃ >= 0``:
  ``min_g̃ ½||g̃ - g||²  s.t.  G g̃ >= 0``. Its dual has only ``K`` variables,
  ``min_v ½ vᵀ(G Gᵀ)v + (G g)ᵀv  s.t.  v >= 0``, and ``g̃ = Gᵀv + g``. As in the authors'
  code, the margin ``γ`` is the lower bound of the dual variables (``v >= γ``), which is the same
  as first adding ``γ Σ_k g_k`` to ``g`` and then projecting: the step is biased towards lowering
  the memory loss, not just keeping it level. The dual is solved exactly here
  (:func:`solve_nonnegative_qp`, an active-set method in float64 on ``K`` numbers).
- **A-GEM** uses one reference gradient ``g_ref``: that of the mean loss on a random sample of the
  whole memory (all past tasks pooled). If ``g · g_ref < 0``: ``g̃ = g + v g_ref`` with
  ``v = max(-g · g_ref / g_ref · g_ref, γ)``. With ``γ = 0`` that is the paper's rule,
  ``g̃ = g - (g · g_ref / g_ref · g_ref) g_ref``, and the default. Any ``γ > 0`` gives GEM's
  projection for the single pooled constraint: an explicit variant (``AGEM(margin=0.5)``), which
  adds at least ``γ · g_ref`` on any violation, however small (see :class:`AGEMConfig`).

Where it runs: ``edit_gradients``, i.e. after gradient accumulation and the DDP all-reduce, and
before gradient clipping (on unscaled gradients under fp16): ``g`` and the reference gradients are
both unclipped, and the clipping threshold bounds the edited ``g̃``, the step actually taken.

Cost per optimizer step: the reference gradients, then ``K`` dot products ``G g`` and their copy to
the host (for GEM; A-GEM needs no synchronisation) and, only when a constraint is violated, the
``K x K`` Gram matrix ``G Gᵀ`` and a second small copy. With the default ``reference_method="auto"``,
GEM's ``K > 1`` reference gradients take ONE plain forward and ONE backward over all the ``K``
memory batches (``"hooks"``), where every trainable weight is that of an ``nn.Linear``, GPT-2's
``Conv1D``, an ``nn.LayerNorm`` or an ``nn.Embedding`` (GPT-2, and LoRA adapters on such layers):
hooks record each layer's input and output gradient, and each group's weight gradient is rebuilt
from them (``Σ dYᵀX`` over the group, one batched product per layer). With a fixed total of memory
rows per step (``memory_batch_size ≈ rows / K``) the step at ``K = 8`` then costs about 1.0 times
the step at ``K = 1`` on CPU without a violated constraint; with one, the projection's passes over
the ``K x P`` references bring it to 1.2-1.3 times (docs/benchmarks.md, section 1). Other causal LMs (Llama's RMSNorm) take ONE
vmapped forward and ONE backward over the ``K`` batches stacked together (``[K, g, L]``), 1.2-1.4
times a plain pass over the same rows (vmap's dispatch); seq2seq models, one forward/backward per
past task (``"per_task"``: the same total work, in ``K`` calls). The gradient is flattened into one
``P``-vector and the references into one ``K x P`` matrix, both allocated once per task and reused
at every step. The reference gradients are computed on the unwrapped model (``torch.autograd`` or
``torch.func``), so ``p.grad`` and DDP's hooks are left alone until ``g̃`` is written back; every
rank computes the same references from the same memory, so the ranks stay in step. Under FSDP2
(DTensor parameters) every buffer holds this rank's shard, the references come from a backward
through the sharded model, and the ``K`` dot products and the ``K x K`` Gram matrix are local
partial sums all-reduced over the ranks (docs/distributed.md).

Adam and the like rescale the edited gradient per coordinate, so the first-order guarantee holds
for the gradient, not for the optimizer's step; the margin (which adds at least ``γ`` times the
memory gradients whenever a constraint is violated) is what keeps the effect under Adam.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, load_from_disk
from torch import nn

from ..modeling import decoder_inputs, is_seq2seq
from ._functional import FunctionalModel, batchable_attention, no_padding_warning, swapped
from .lwf import has_active_dropout
from ._row_gradients import GroupBufferSink, _maybe_eval, check_hooked, hooked_group_gradients, row_gradient_modules
from ..sharding import all_reduce_sum_like, is_dtensor, like_param, local_part
from .base import (
    Strategy,
    StrategyConfig,
    TaskInfo,
    check_range,
    eval_mode,
    load_tensor_json_state,
    register_strategy,
    save_tensor_json_state,
    trainable_parameters,
    unwrap_model,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import ContinualTrainer

logger = logging.getLogger(__name__)

# Row columns the memory keeps: what the model reads, nothing else (no side columns, no raw text).
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")
_MEMORY_DIR = "memory"
REFERENCE_METHODS = ("auto", "hooks", "vmap", "per_task", "batched")


# --- the projections, as plain tensor functions ---------------------------------------------------
def solve_nonnegative_qp(P: torch.Tensor, q: torch.Tensor, lower: float = 0.0, *, max_iter: int | None = None) -> torch.Tensor:
    """Solve ``min_v ½ vᵀPv + qᵀv  s.t.  v >= lower`` for a small symmetric PSD ``P`` (``K x K``).

    This is GEM's dual problem (``P = G Gᵀ``, ``q = G g``). With ``v = lower + u`` it becomes a
    non-negative least-squares problem in Gram form, which the Lawson-Hanson active-set method
    solves exactly in finitely many steps; only ``P`` and ``q`` are needed, never ``G``. Runs in
    float64 on the CPU (``K`` is the number of past tasks).

    Args:
        P (`torch.Tensor`): ``K x K`` symmetric positive semi-definite matrix.
        q (`torch.Tensor`): ``K`` vector.
        lower (`float`): Lower bound of every variable (GEM's margin ``γ``).
        max_iter (`int`, *optional*): Cap on active-set changes (default ``10 K + 20``).

    Returns:
        `torch.Tensor`: The minimiser ``v`` (float64, CPU).

    Example:

    >>> P = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); q = torch.tensor([-2.0, 3.0])
    >>> solve_nonnegative_qp(P, q).tolist()
    [1.0, 0.0]
    """
    P = P.detach().to("cpu", torch.float64)
    q = q.detach().to("cpu", torch.float64)
    K = q.shape[0]
    P = 0.5 * (P + P.T)
    if lower:
        q = q + lower * P.sum(1)
    # The loop runs on NumPy arrays: on K numbers, each torch call's fixed cost (~5-10 µs, some 30
    # per active-set change) made the solve take milliseconds at K = 8 with every constraint
    # violated; NumPy's is a fraction of that, and LAPACK's gelsd is the same solver.
    P_, q_ = P.numpy(), q.numpy()
    scale = max(float(np.abs(P_).max()), float(np.abs(q_).max()), 1e-300)
    tol = 1e-12 * K * scale
    max_iter = max_iter if max_iter is not None else 10 * K + 20
    x = np.zeros(K)
    passive = np.zeros(K, dtype=bool)
    excluded = np.zeros(K, dtype=bool)  # numerically degenerate directions, skipped
    w = -q_  # negative gradient of the objective at x = 0
    for _ in range(max_iter):
        candidates = ~passive & ~excluded & (w > tol)
        if not candidates.any():
            break
        j = int(np.where(candidates, w, -np.inf).argmax())
        passive[j] = True
        for _ in range(max_iter):
            z = _solve_on(P_, q_, passive)
            if (z[passive] > 0).all():
                x = z
                break
            if not x[j] > 0 and not z[j] > 0:
                # j cannot enter (rounding in a nearly singular P): drop it and look elsewhere.
                passive[j], excluded[j] = False, True
                break
            blocking = passive & (z <= 0)
            alpha = float((x[blocking] / (x[blocking] - z[blocking])).min())
            x = x + alpha * (z - x)
            passive &= x > tol
            x = np.where(passive, x, 0.0)
        w = -(q_ + P_ @ x)
    return torch.from_numpy(x + lower)


def _solve_on(P: np.ndarray, q: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """Unconstrained minimiser over the passive variables, the others held at 0 (least squares)."""
    index = np.flatnonzero(passive)
    z = np.zeros_like(q)
    if index.size:
        z[index] = np.linalg.lstsq(P[np.ix_(index, index)], -q[index], rcond=None)[0]
    return z


_GRAM_BLOCK = 1 << 15  # columns of G per block on CPU: 8 rows of 32768 floats (1 MiB) stay in cache


def gram_matrix(G: torch.Tensor, block: int = _GRAM_BLOCK) -> torch.Tensor:
    """``G Gᵀ`` for a wide ``K x P`` matrix, summed over blocks of columns on the CPU.

    One ``G @ G.T`` on the CPU with ``P`` in the millions streams ``G`` from memory several times
    and accumulates each ``P``-long dot product in float32 in a way that loses digits: on a
    ``8 x 5M`` matrix it measured 168 ms and a relative error of 7.5e-4 (against float64), the
    blocked sum 61 ms and 5.8e-7 (``OMP_NUM_THREADS=1``, docs/benchmarks.md section 1). On other
    devices it is the one product (one kernel).

    Args:
        G (`torch.Tensor`): The ``K x P`` matrix.
        block (`int`): Columns per block on the CPU.

    Returns:
        `torch.Tensor`: The ``K x K`` Gram matrix.

    Example:

    >>> G = torch.arange(6.0).view(2, 3)
    >>> gram_matrix(G, block=2).tolist()
    [[5.0, 14.0], [14.0, 50.0]]
    """
    if G.device.type != "cpu" or G.shape[1] <= block:
        return G @ G.T
    gram = G[:, :block] @ G[:, :block].T
    for start in range(block, G.shape[1], block):
        part = G[:, start : start + block]
        gram.addmm_(part, part.T)
    return gram


def project_gem_(g: torch.Tensor, G: torch.Tensor, margin: float = 0.0, *, reduce: Callable[[torch.Tensor], Any] | None = None) -> bool:
    """GEM's projection of ``g`` (``P``) against the reference gradients ``G`` (``K x P``), in place.

    Nothing changes unless some ``g · g_k < 0``; then ``g <- g + Gᵀv`` with ``v`` the solution of the
    dual QP (bounded below by ``margin``), so that ``G g̃ >= 0``.

    A device-to-host copy of the ``K`` products ``G g`` decides whether to project; only then is the
    ``K x K`` Gram matrix ``G Gᵀ`` computed (the larger product: ``K²P`` against ``KP``) and copied
    to the host for the dual problem. So a step that violates no constraint costs one matrix-vector
    product and one small synchronisation, and one that does, two.

    Args:
        g (`torch.Tensor`): The gradient, a ``P`` vector (edited in place).
        G (`torch.Tensor`): The ``K x P`` reference gradients.
        margin (`float`): Lower bound ``γ`` of the dual variables.
        reduce (`Callable`, *optional*): Under sharding (FSDP2), ``g`` and ``G`` hold this rank's
            coordinates only: ``reduce`` returns the sum of a tensor of local partial results over
            the ranks (:func:`~clm_hf.sharding.all_reduce_sum_like`). It is applied to ``G g`` and
            ``G Gᵀ``, so every rank solves the same QP and projects its own coordinates.

    Returns:
        `bool`: Whether ``g`` was projected.

    Example:

    >>> g = torch.tensor([1.0, -1.0]); G = torch.tensor([[0.0, 1.0]])
    >>> project_gem_(g, G), g.tolist()
    (True, [1.0, 0.0])
    """
    dots = G @ g
    if reduce is not None:
        dots = reduce(dots)
    dots = dots.to("cpu", torch.float64)  # the first sync: K numbers
    if not bool((dots < 0).any()):
        return False
    gram = gram_matrix(G)
    if reduce is not None:
        gram = reduce(gram)
    v = solve_nonnegative_qp(gram.to("cpu", torch.float64), dots, margin)
    g.addmv_(G.T, v.to(device=G.device, dtype=G.dtype))
    return True


def project_agem_(g: torch.Tensor, reference: torch.Tensor, margin: float = 0.0, *,
                  reduce: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """A-GEM's projection of ``g`` against one reference gradient ``r``, in place and without a sync.

    If ``g · r < 0``: ``g <- g + v r`` with ``v = max(-g · r / (r · r), margin)``; otherwise ``g`` is
    left as it is. ``margin = 0`` is the rule of the A-GEM paper, ``g - (g · r / r · r) r``, and any
    ``margin`` gives exactly GEM's projection for a single constraint.

    Args:
        g (`torch.Tensor`): The gradient, a ``P`` vector (edited in place).
        reference (`torch.Tensor`): The reference gradient ``r``, a ``P`` vector.
        margin (`float`): Lower bound ``γ`` of ``v``.
        reduce (`Callable`, *optional*): Under sharding, returns the sum of local partial results
            over the ranks; applied to ``(g · r, r · r)`` (one collective), so every rank takes the
            same decision and scales its own coordinates.

    Returns:
        `torch.Tensor`: A 0-dim bool tensor, whether ``g`` was projected (left on the device).

    Example:

    >>> g = torch.tensor([1.0, -1.0])
    >>> bool(project_agem_(g, torch.tensor([0.0, 2.0]))), g.tolist()
    (True, [1.0, 0.0])
    """
    if reduce is None:
        dot, norm = g @ reference, reference @ reference
    else:
        dot, norm = reduce(torch.stack([g @ reference, reference @ reference]))
    violated = dot < 0
    v = (-dot / norm.clamp_min(torch.finfo(g.dtype).tiny)).clamp(min=margin)
    g.addcmul_(reference, v * violated)
    return violated


# --- reference gradients on the memory -----------------------------------------------------------
def memory_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], groups: torch.Tensor | None = None, num_groups: int = 1
) -> torch.Tensor:
    """The mean token NLL of each group of rows, as a ``num_groups`` vector, from one forward pass.

    Each group's loss is the mean over its supervised tokens, like the model's own loss on that
    group alone (padding is masked out, so it changes nothing).

    Args:
        model (`nn.Module`): A causal or seq2seq LM (unwrapped: call it outside DDP).
        batch (`dict`): Padded rows (``input_ids``, ``labels``, ``attention_mask``, ...).
        groups (`torch.Tensor`, *optional*): Group of every row, in ``[0, num_groups)``; ``None``
            puts all rows in one group.
        num_groups (`int`): Number of groups ``K``.
    """
    seq2seq = is_seq2seq(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs.update(decoder_inputs(model, batch, seq2seq))
    logits = model(**inputs, **_no_cache(model)).logits
    if not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    row_sums, row_counts = nll.view(labels.shape).sum(1), (labels != -100).sum(1).to(nll.dtype)
    if groups is None:
        return (row_sums.sum() / row_counts.sum().clamp_min(1)).unsqueeze(0)
    zeros = torch.zeros(num_groups, device=nll.device, dtype=nll.dtype)
    return zeros.index_add(0, groups, row_sums) / zeros.index_add(0, groups, row_counts).clamp_min(1)


def reference_gradients_(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    out: list[torch.Tensor],
    *,
    method: str = "per_task",
) -> None:
    """Write into ``out`` the gradient of the mean loss on each of the ``K`` ``batches``.

    ``out`` holds, per parameter, a ``(K, *p.shape)`` tensor (views into one ``K x P`` buffer);
    ``p.grad`` is not touched. Runs in eval mode (no dropout), so the result is deterministic. The
    loss of batch ``k`` is its mean token NLL (:func:`memory_losses` on that batch alone).

    - ``"per_task"``: one forward and one backward per batch, each on its own rows. The work is that
      of one forward/backward over all the rows, but in ``K`` separate calls: with few rows per
      batch, the fixed cost of each call dominates.
    - ``"batched"``: one forward over all the rows, then ONE batched backward that returns the ``K``
      gradients (``torch.autograd.grad(losses, grad_outputs=I_K, is_grads_batched=True)``). Fewer,
      larger kernels, but each of the ``K`` backward lanes runs over all ``K`` batches' rows (the
      others' get zero gradient), so the backward work grows as ``K²``.
    - ``"hooks"``: the batches are stacked into ``[K, g, L]`` tensors as for ``"vmap"``, and the
      ``K g`` rows run as ONE ordinary batch (attention mask kept) through one forward and one
      backward that computes only the activations' gradients; the ``K`` weight gradients are
      rebuilt from each layer's input and output gradient (:func:`_hook_reference_gradients_`).
      Every trainable weight must belong to a layer of a known type (:func:`row_gradient_modules`,
      else ``ValueError``).
    - ``"vmap"``: the batches are stacked into ``[K, g, L]`` tensors (``g`` the most rows of a
      batch, ``L`` the longest row; missing rows are filled with dummy rows labelled ``-100``, which
      count nothing) and ONE ``torch.func.vmap``-ped forward over the ``K`` groups, each with its
      own (stride-0) copy of the weights, and ONE backward give the ``K`` gradients (see
      :func:`_vmap_reference_gradients_`). The work is that of one pass over ``K x g`` rows, in a
      number of kernel calls that does not depend on ``K``. Causal LMs only, with right padding
      (checked): the attention mask, which vmap cannot trace through HF's mask code, is dropped;
      under causal attention no real token sees the pads that follow it, and the positions are
      the same. Seq2seq models (a bidirectional encoder) raise ``ValueError``.

    All give the same gradients (up to float rounding).
    """
    with eval_mode(model), torch.enable_grad():
        if method == "hooks":
            modules = row_gradient_modules(model, _named(model, params))
            return _hook_reference_gradients_(model, modules, _stack_groups(batches), out)
        if method == "vmap":
            _check_vmappable(model, _all_right_padded(batches))
            forward = FunctionalModel(model, _named(model, params))
            return _vmap_reference_gradients_(forward, _stack_groups(batches), out)
        if method == "batched" and len(batches) > 1:
            batch, groups = _concatenate(batches)
            losses = memory_losses(model, batch, groups, len(batches))
            eye = torch.eye(len(batches), device=losses.device, dtype=losses.dtype)
            grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
            for view, grad in zip(out, grads):
                view.zero_() if grad is None else view.copy_(grad)
            return
        if method not in ("per_task", "batched"):
            raise ValueError(f"method must be 'per_task', 'batched', 'vmap' or 'hooks', got {method!r}.")
        for k, batch in enumerate(batches):
            grads = torch.autograd.grad(memory_losses(model, batch)[0], params, allow_unused=True)
            for view, grad in zip(out, grads):
                view[k].zero_() if grad is None else view[k].copy_(grad)


def _vmap_reference_gradients_(forward: FunctionalModel, stacked: dict[str, torch.Tensor], out: list[torch.Tensor], *,
                                switch_to_eval: bool = True) -> None:
    """The ``K`` group gradients of a causal LM in one vmapped forward and one backward, into ``out``.

    ``stacked`` holds ``[K, g, L]`` right-padded tensors; an ``attention_mask`` in it is ignored
    (see :func:`reference_gradients_`). ``out`` follows the order of ``forward.params``.

    Each group (vmap lane) gets its own copy of the trainable weights: a stride-0 ``expand`` of
    them to ``[K, ...]``, so no memory is copied. Group ``k``'s loss depends only on copy ``k``, so
    one ordinary backward of the summed losses gives, as the gradient of the ``[K, ...]`` copies,
    every group's gradient at once: the same numbers as ``vmap(grad(group_loss))`` over shared
    weights, but the backward is run by autograd on the batched kernels instead of being
    re-dispatched through torch.func (15-25% faster on CPU for 5 groups of 4 rows). And the
    copies' ``.grad`` are the (zeroed) views ``out``, into which autograd accumulates in place: no
    ``K x P`` temporary and no copy (another ~10% on a 3M-parameter model).
    """
    from torch.func import vmap

    keys = [k for k in stacked if k not in ("labels", "attention_mask")]
    extra = _no_cache(forward.model)
    groups = stacked["labels"].shape[0]

    def group_loss(weights: dict[str, torch.Tensor], labels: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        logits = forward(weights, **dict(zip(keys, tensors)), **extra).logits[:, :-1]
        labels = labels[:, 1:]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return nll / (labels != -100).sum().clamp_min(1)

    copies = [p.detach().expand(groups, *p.shape).requires_grad_() for p in forward.params.values()]
    direct = [c.dtype == view.dtype for c, view in zip(copies, out)]  # else (bf16 weights): copied after
    zeroed = [view for view, d in zip(out, direct) if d]
    if zeroed:
        torch._foreach_zero_(zeroed)
    for copy, view, d in zip(copies, out, direct):
        if d:
            copy.grad = view
    with _maybe_eval(forward.model, switch_to_eval), no_padding_warning(forward.model), batchable_attention(), torch.enable_grad(), \
            warnings.catch_warnings():
        # Known and harmless here: a gradient's strides cannot match those of a stride-0 copy.
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
        losses = vmap(group_loss)(dict(zip(forward.params, copies)), stacked["labels"], *[stacked[k] for k in keys])
        torch.autograd.backward(losses.sum(), inputs=copies)
    for copy, view in zip(copies, out):
        if copy.grad is not view:  # not accumulated in place
            view.zero_() if copy.grad is None else view.copy_(copy.grad)


# --- reference gradients from one plain pass, grouped from the layers' inputs and output gradients --
def _hook_reference_gradients_(model: nn.Module, modules: dict[nn.Module, dict[str, int]], stacked: dict[str, torch.Tensor],
                               out: list[torch.Tensor], *, switch_to_eval: bool = True) -> None:
    """The ``K`` group gradients from ONE plain forward and ONE backward over all the rows, into ``out``.

    ``stacked`` holds ``[K, g, L]`` padded groups (filler rows labelled -100, as from
    :meth:`_MemoryBank.stacked`); ``modules`` is :func:`row_gradient_modules`'s answer, whose
    indices point into ``out``. The ``K g`` rows run through the model as one ordinary batch with
    their attention mask (so any padding side and seq2seq models work), the loss being the sum of
    the ``K`` group means. A forward hook records the input and the output of every call of a
    hooked module, and the backward asks autograd for the gradients of those outputs only, not of
    the weights: it runs the activation half of an ordinary backward. Because every group's loss
    depends only on its own rows, group ``k``'s weight gradient is then the sum over its rows of
    the per-layer products: for a linear layer ``Σ dYᵀX`` over the group (one batched matmul over
    the ``K`` groups, written into the ``K x P`` buffer), for a layer norm ``Σ dY · x̂``, for an
    embedding a scatter-add of ``dY`` at the group's token ids. The work is that of one
    forward/backward over the ``K g`` rows whatever ``K`` is, in the same kernels as a plain pass
    (no vmap dispatch); only the weight gradients are ``K`` times larger. The pass is
    :func:`~clm_hf.strategies._row_gradients.hooked_group_gradients`, shared with EWC's Fisher (one
    group per row there).
    """
    groups, rows = stacked["labels"].shape[:2]
    batch = {key: value.flatten(0, 1) for key, value in stacked.items()}
    for key in ("attention_mask", "decoder_attention_mask"):
        if key in batch:  # filler rows count nothing, but a fully masked row may give NaN attention: unmask them
            mask = batch[key]
            batch[key] = torch.where(mask.bool().any(1, keepdim=True), mask, torch.ones_like(mask))
    group_of_row = torch.arange(groups, device=batch["labels"].device).repeat_interleave(rows)
    hooked_group_gradients(model, modules, lambda: memory_losses(model, batch, group_of_row, groups).sum(), groups,
                           groups * rows, GroupBufferSink(out), switch_to_eval=switch_to_eval)


def _no_cache(model: nn.Module) -> dict[str, bool]:
    # A loss pass has no use for a KV cache; building one costs copies of every layer's keys/values.
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def _named(model: nn.Module, params: list[nn.Parameter]) -> dict[str, nn.Parameter]:
    """``params`` by their names in ``model`` (unwrapped), in the order of ``params``."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"{len(missing)} of the parameters are not parameters of the model.")
    return {names[id(p)]: p for p in params}


def _right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of a 0/1 attention mask is ones then zeros (one host sync)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True


def _all_right_padded(batches: list[dict[str, torch.Tensor]]) -> bool:
    return all(_right_padded(b["attention_mask"]) for b in batches if "attention_mask" in b)


def _check_vmappable(model: nn.Module, right_padded: bool) -> None:
    if is_seq2seq(model):
        raise ValueError("The 'vmap' reference gradients need a decoder-only (causal) LM; use 'per_task'.")
    if not right_padded:
        raise ValueError("The 'vmap' reference gradients need right-padded rows; use 'per_task'.")


_PAD_VALUES = {"labels": -100}  # anything else pads with 0 (ids under a 0 mask, or masks)


def _concatenate(batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stack padded batches of different widths into one, with the batch index of every row."""
    joined = {}
    for key in batches[0]:
        width = max(b[key].shape[1] for b in batches)
        value = _PAD_VALUES.get(key, 0)
        joined[key] = torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
    sizes = torch.tensor([b["labels"].shape[0] for b in batches])
    groups = torch.repeat_interleave(torch.arange(len(batches)), sizes).to(joined["labels"].device)
    return joined, groups


def _stack_groups(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``K`` padded batches into ``[K, g, L]`` tensors: rows padded with dummy rows, widths
    on the right (``labels`` with -100, so that neither counts in the loss; the rest with 0)."""
    rows = max(b["labels"].shape[0] for b in batches)
    stacked = {}
    for key in batches[0]:
        width = max(b[key].shape[1] for b in batches)
        value = _PAD_VALUES.get(key, 0)
        stacked[key] = torch.stack(
            [F.pad(b[key], (0, width - b[key].shape[1], 0, rows - b[key].shape[0]), value=value) for b in batches]
        )
    return stacked


class _MemoryBank:
    """All memory rows padded into tensors on the model's device, built once per task."""

    def __init__(self, memories: list[Dataset], collator: Any, device: torch.device) -> None:
        columns = [c for c in MODEL_COLUMNS if all(c in m.column_names for m in memories)]
        rows = [row for m in memories for row in m.select_columns(columns)]
        batch = collator(rows)
        self.tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        # Real length of every row and key (kept on the CPU), to trim padding off a selection. A
        # mask the collator made up has the rows' input_ids lengths.
        self.lengths = {k: torch.tensor([len(r[k]) for r in rows]) for k in self.tensors if k in columns}
        for key, source in (("attention_mask", "input_ids"), ("decoder_attention_mask", "decoder_input_ids")):
            if key in self.tensors and key not in self.lengths and source in self.lengths:
                self.lengths[key] = self.lengths[source]
        sizes = [len(m) for m in memories]
        self.starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        self.num_rows = self.starts[-1]
        mask = self.tensors.get("attention_mask")
        self.right_padded = mask is None or _right_padded(mask)
        # One dummy row after the real ones (index num_rows) fills the groups of stacked().
        for key, values in self.tensors.items():
            dummy = values.new_full((1, values.shape[1]), _PAD_VALUES.get(key, 0))
            self.tensors[key] = torch.cat([values, dummy])

    def task_rows(self, k: int) -> slice:
        """The rows of the ``k``-th task's memory."""
        return slice(self.starts[k], self.starts[k + 1])

    def batch(self, rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        """The selected rows (a slice, or a CPU index tensor), their padding trimmed."""
        if isinstance(rows, torch.Tensor):
            device_rows = rows.to(next(iter(self.tensors.values())).device, non_blocking=True)
        out = {}
        for key, values in self.tensors.items():
            lengths = self.lengths.get(key)
            width = int(lengths[rows].max()) if lengths is not None else values.shape[1]
            out[key] = values[rows, :width] if isinstance(rows, slice) else values[device_rows, :width]
        return out

    def stacked(self, selections: list[slice | torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``K`` selections as ``[K, g, L]`` tensors (``g`` the largest selection, ``L`` the
        longest row), in one gather per key: smaller selections are filled with a dummy row whose
        labels are all -100 (it counts nothing), widths keep the collator's padding."""
        groups = [torch.arange(r.start, r.stop) if isinstance(r, slice) else r for r in selections]
        size = max(len(rows) for rows in groups)
        index = torch.full((len(groups), size), self.num_rows)
        for k, rows in enumerate(groups):
            index[k, : len(rows)] = rows
        real = torch.cat(groups)
        device_index = index.flatten().to(next(iter(self.tensors.values())).device, non_blocking=True)
        out = {}
        for key, values in self.tensors.items():
            lengths = self.lengths.get(key)
            width = int(lengths[real].max()) if lengths is not None else values.shape[1]
            out[key] = values[device_index, :width].view(len(groups), size, width)
        return out


# --- the shared strategy ---------------------------------------------------------------------------
AUTO = "auto"


def _check_rows(name: str, value: int | str | None, *, allow_none: bool) -> None:
    """``value`` must be ``"auto"``, a positive int, or (where allowed) None; else a ValueError naming it."""
    if value == AUTO or (allow_none and value is None):
        return
    if isinstance(value, str) or value is None:
        allowed = "'auto', None or a positive int" if allow_none else "'auto' or a positive int"
        raise ValueError(f"{name} must be {allowed}; got {value!r}.")
    check_range(name, value, low=1)


def auto_reference_rows(trainer: Any) -> int | None:
    """The memory rows per optimizer step that ``"auto"`` uses: half a training micro-batch.

    A reference pass over ``r`` rows costs about ``r / b`` of a training step on a micro-batch of
    ``b`` rows (forward and backward; less with gradient accumulation, which runs several
    micro-batches per step), and needs the activation memory of ``r`` rows: half a micro-batch
    keeps the step overhead near 1.5x and never needs more memory than training does.
    ``None`` outside a trainer (no batch size to follow). Under DDP it follows the per-device
    batch (every rank computes the same references on its own), so a run on ``n`` processes with
    batch ``b`` draws the rows a single process with batch ``b`` would, not one with batch ``n b``.

    Example:

    >>> from types import SimpleNamespace
    >>> auto_reference_rows(SimpleNamespace(args=SimpleNamespace(per_device_train_batch_size=16)))
    8
    """
    batch = getattr(getattr(trainer, "args", None), "per_device_train_batch_size", None)
    return max(1, int(batch) // 2) if batch else None


@dataclass
class EpisodicMemoryConfig(StrategyConfig):
    """Settings shared by :class:`GEM` and :class:`AGEM`.

    Args:
        memory_per_task (`int`): Training rows of each task kept in the episodic memory.
        seed (`int`): Seed of the choice of memory rows and of the per-step draws.
    """

    memory_per_task: int = field(default=64, metadata={"help": "Rows of each task kept in the episodic memory."})
    seed: int = field(default=0, metadata={"help": "Seed of the memory rows and of the per-step draws."})

    def validate(self) -> None:
        check_range("memory_per_task", self.memory_per_task, low=1)


class EpisodicGradientStrategy(Strategy):
    """Base of GEM and A-GEM: the per-task episodic memory and the gradient plumbing.

    Subclasses choose which memory rows feed each step (:meth:`draw`) and how ``g`` is projected
    against the reference gradients (:meth:`project`).
    """

    config_class = EpisodicMemoryConfig
    # DeepSpeed runs the step in backward, before edit_gradients could run: on ZeRO-2 the projection runs
    # inside the step instead (edit_zero_gradients), on this rank's partition of the reduced gradient.
    needs_whole_gradients = True
    # Under FSDP2 the gradients, references and dot products stay sharded; only K and K x K numbers are reduced.
    supports_fsdp = True
    supports_packed_rows = False  # the memory batches are padded rows, not one flattened sequence

    def __init__(self, config: EpisodicMemoryConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.memories: dict[str, Dataset] = {}  # task_id -> rows, in task order
        self.steps = 0  # optimizer steps that saw a memory
        self._projected: torch.Tensor | int = 0  # steps whose gradient was projected
        self._bank: _MemoryBank | None = None
        self._binding: tuple[nn.Module, list[nn.Parameter], int] | None = None
        self._flat: torch.Tensor | None = None  # g, one P-vector
        self._refs: torch.Tensor | None = None  # the K x P reference gradients
        self._flat_views: list[torch.Tensor] = []
        self._ref_views: list[torch.Tensor] = []
        self._batched = True
        self._vmap = True  # False once a vmapped pass failed ("auto" then uses "per_task")
        # "hooks": (model, the modules to hook or the reason they cannot be) and whether the pass
        # was checked against autograd's gradients once since the last binding.
        self._hook_plan: tuple[nn.Module, dict[nn.Module, dict[str, int]] | str] | None = None
        self._hooks_checked = False
        self._forward: FunctionalModel | None = None  # the model as a function, for "vmap" and "per_task"
        # Detached aliases of the trainable parameters (leaves sharing their storage) whose ``.grad``
        # are the reference buffers' views: a backward through them writes the reference gradients
        # in place (no gradient tensors allocated, none copied).
        self._aliases: list[torch.Tensor] = []
        self._dropout = True  # whether the bound model has active dropout (else no train/eval switch)
        self._sharded = False  # whether the bound parameters are FSDP2 shards (DTensors)

    @property
    def projected_steps(self) -> int:
        """How many optimizer steps had their gradient projected (a sync when read)."""
        return int(self._projected)

    # --- memory ------------------------------------------------------------------------------
    def after_task(self, trainer: ContinualTrainer, task: TaskInfo) -> None:
        rows = task.train_dataset
        count = min(self.config.memory_per_task, len(rows))
        columns = [c for c in MODEL_COLUMNS if c in rows.column_names]
        chosen = rows.shuffle(seed=self.config.seed + 7919 * task.index).select(range(count))
        self.memories[task.task_id] = chosen.select_columns(columns).flatten_indices()
        self._bank, self._binding = None, None  # one more past task: rebuild both lazily

    def memory_bank(self, device: torch.device) -> _MemoryBank:
        """Every past task's memory rows, collated once and kept on ``device`` (rebuilt after each new task)."""
        if self._bank is None:
            collator = getattr(self.trainer, "data_collator", None)
            if collator is None:
                from ..data import ContinualDataCollator

                collator = ContinualDataCollator(pad_token_id=0)
            self._bank = _MemoryBank(list(self.memories.values()), collator, device)
        return self._bank

    # --- gradients -----------------------------------------------------------------------------
    def _bind(self, model: nn.Module, num_refs: int) -> list[nn.Parameter]:
        """Flat buffers for g (P) and the references (K x P), allocated once per task and reused."""
        if self._binding is not None and self._binding[0] is model and self._binding[2] == num_refs:
            return self._binding[1]
        params = list(trainable_parameters(model).values())
        if not params:
            raise ValueError(f"{type(self).__name__} found no trainable parameter.")
        # Under FSDP2 a parameter is a DTensor: the buffers hold this rank's shard of each one.
        total = sum(local_part(p).numel() for p in params)
        device = params[0].device
        self._flat = torch.zeros(total, device=device, dtype=torch.float32)
        self._refs = torch.zeros(num_refs, total, device=device, dtype=torch.float32)
        self._flat_views, self._ref_views, offset = [], [], 0
        for p in params:
            shape = local_part(p).shape
            n = shape.numel()
            self._flat_views.append(self._flat[offset : offset + n].view(shape))
            self._ref_views.append(self._refs[:, offset : offset + n].view(num_refs, *shape))
            offset += n
        self._binding = (model, params, num_refs)
        self._forward = None
        self._hook_plan, self._hooks_checked = None, False
        self._sharded = any(is_dtensor(p) for p in params)
        self._aliases = [] if self._sharded else [p.detach().requires_grad_() for p in params]
        # A model that checkpoints activations in training mode keeps the switch too: eval mode
        # turns checkpointing off, which torch.func's vmap needs.
        self._dropout = has_active_dropout(model) or any(getattr(m, "gradient_checkpointing", False) is True
                                                         for m in model.modules())
        return params

    def _this_steps_memory(self, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter], _MemoryBank, list]:
        """The bare model, its parameters bound to the flat buffers, the memory bank and this step's draw from it."""
        bare = unwrap_model(model)
        params = self._bind(bare, self.num_references())
        bank = self.memory_bank(params[0].device)
        return bare, params, bank, self.draw(bank, self._draw_seed())

    def edit_gradients(self, model: nn.Module) -> None:
        if not self.memories:
            return
        bare, params, bank, selections = self._this_steps_memory(model)
        for view, p in zip(self._flat_views, params):
            view.zero_() if p.grad is None else view.copy_(local_part(p.grad))
        reduce = None
        if self._sharded:
            self._sharded_references(bare, params, bank, selections)
            # g and the references hold this rank's shard: dot products and the Gram matrix are
            # local partial sums, summed over the ranks, so every rank decides and solves alike.
            reduce = lambda partial: all_reduce_sum_like(partial, params[0])  # noqa: E731
        else:
            self._fill_references(bare, params, None, bank=bank, selections=selections)
        projected = self.project(self._flat, self._refs, reduce=reduce)
        self.steps += 1
        if projected is False:
            return
        self._projected = self._projected + projected
        for view, p in zip(self._flat_views, params):
            if p.grad is None:
                p.grad = like_param(view.to(p.dtype).clone(), p)
            else:
                local_part(p.grad).copy_(view)

    def edit_zero_gradients(self, model: nn.Module, gradients: Any) -> None:
        """Under DeepSpeed ZeRO-2: project this rank's partition of the reduced gradient (see
        :class:`~clm_hf.deepspeed_support.Zero2GradientPartition`).

        ZeRO-2 keeps whole weights, so the ``K`` reference gradients are computed as without
        DeepSpeed, by the hook-free functional paths (``torch.func`` / detached aliases: a backward
        through the parameters themselves would fire DeepSpeed's reduction hooks into the task's
        gradient buckets), then cut like this rank's partition. As under FSDP2, the dot products
        and the Gram matrix are partial sums all-reduced over the ranks, every rank solves the same
        QP, and each projects its own partition.
        """
        if not self.memories:
            return
        bare, params, bank, selections = self._this_steps_memory(model)
        self._fill_references(bare, params, None, bank=bank, selections=selections)
        g = gradients.read()
        refs = gradients.slice_rows(self._ref_views, params, self._refs.new_empty(self._refs.shape[0], g.numel()))
        projected = self.project(g, refs, reduce=gradients.all_reduce_sum)
        self.steps += 1
        if projected is False:
            return
        self._projected = self._projected + projected
        gradients.write(g)

    def _sharded_references(self, model: nn.Module, params: list[nn.Parameter], bank: _MemoryBank,
                            selections: list[slice | torch.Tensor]) -> None:
        """The ``K`` reference gradients under FSDP2, this rank's shard of each, into the ``K x P`` buffer.

        FSDP2 computes forward and backward on unsharded copies it gathers and frees itself, so
        ``torch.autograd.grad`` with respect to the sharded parameters (or the functional paths)
        sees no gradient. An ordinary backward through the model does: FSDP2 reduce-scatters it
        into each parameter's (sharded) ``.grad``. So the training gradient is set aside, each
        reference loss is backpropagated into the emptied ``.grad`` and its shard copied out, and
        the training gradient is put back. Every rank computes the same losses on the same memory
        rows, so FSDP2's average over the ranks is the gradient itself.
        """
        saved = [p.grad for p in params]
        sync = getattr(model, "set_requires_gradient_sync", None)
        if callable(sync):
            sync(True)  # the reference gradients must be reduce-scattered whole
        try:
            with _maybe_eval(model, self._dropout), torch.enable_grad():
                for k, rows in enumerate(selections):
                    for p in params:
                        p.grad = None
                    memory_losses(model, bank.batch(rows))[0].backward()
                    for view, p in zip(self._ref_views, params):
                        view[k].zero_() if p.grad is None else view[k].copy_(local_part(p.grad))
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad

    def _reference_method(self, model: nn.Module, bank: _MemoryBank | None, num_groups: int = 2) -> str:
        """The method the configured ``reference_method`` resolves to for this model and memory."""
        method = getattr(self.config, "reference_method", "per_task")
        if method == "auto":
            # One group is one plain pass either way, without the grouping's overhead.
            if num_groups > 1 and isinstance(self._row_modules(model), dict):
                return "hooks"
            usable = num_groups > 1 and self._vmap and not is_seq2seq(model) and (bank is None or bank.right_padded)
            return "vmap" if usable else "per_task"
        if method == "batched" and not self._batched:
            return "per_task"
        return method

    def _fill_references(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        batches: list[dict[str, torch.Tensor]] | None,
        *,
        bank: _MemoryBank | None = None,
        selections: list[slice | torch.Tensor] | None = None,
    ) -> None:
        """Fill the ``K x P`` references from ``batches``, or from ``selections`` of ``bank``."""
        groups = len(batches if batches is not None else selections)
        method = self._reference_method(model, bank, groups)
        if method == "hooks":
            try:
                modules = self._row_modules(model, params)
                if isinstance(modules, str):
                    raise ValueError(modules)
                stacked = bank.stacked(selections) if bank is not None else _stack_groups(batches)
                _hook_reference_gradients_(model, modules, stacked, self._ref_views, switch_to_eval=self._dropout)
                if not self._hooks_checked:
                    self._check_hook_references(model, params, batches, bank, selections)
                return None
            except Exception as err:  # noqa: BLE001 - any model the hooks do not fit falls back
                if self._must_raise(err, "hooks"):
                    raise
                logger.warning("%s: the hooked reference pass failed (%s); using the vmapped or per-task one.", self.name, err)
                self._hook_plan = (model, str(err))
                method = self._reference_method(model, bank, groups)
        if method == "vmap":
            try:
                _check_vmappable(model, bank.right_padded if bank is not None else _all_right_padded(batches))
                stacked = bank.stacked(selections) if bank is not None else _stack_groups(batches)
                return self._vmap_references(model, params, stacked)
            except Exception as err:  # noqa: BLE001 - any vmap incompatibility falls back
                if self._must_raise(err, "vmap"):
                    raise
                logger.warning("%s: vmapped reference gradients failed (%s); using one backward per task.", self.name, err)
                self._vmap = False
                method = "per_task"
        if batches is None:
            batches = [bank.batch(rows) for rows in selections]
        if method == "per_task" and self._aliases:
            return self._direct_references(model, params, batches)
        if method == "batched":
            try:
                return reference_gradients_(model, params, batches, self._ref_views, method="batched")
            except RuntimeError as err:
                logger.warning("%s: the batched backward failed (%s); using one backward per task.", self.name, err)
                self._batched = False
        reference_gradients_(model, params, batches, self._ref_views, method="per_task")

    def _row_modules(self, model: nn.Module, params: list[nn.Parameter] | None = None) -> dict[nn.Module, dict[str, int]] | str:
        """:func:`row_gradient_modules` of ``model`` (cached), or why it does not apply, as a string."""
        if self._hook_plan is None or self._hook_plan[0] is not model:
            named = _named(model, params) if params is not None else trainable_parameters(model)
            try:
                self._hook_plan = (model, row_gradient_modules(model, named))
            except ValueError as err:
                self._hook_plan = (model, str(err))
        return self._hook_plan[1]

    def _must_raise(self, err: BaseException, method: str) -> bool:
        """Whether a failed ``method`` reference pass is raised rather than left for the next method.

        Raised when the user asked for that method, and on out of memory: that is no misfit of the
        model, the fall-back needs more memory still, and recording the switch would keep it for the
        rest of the run instead of telling the user the memory batch is too big.
        """
        return getattr(self.config, "reference_method", None) == method or isinstance(err, torch.OutOfMemoryError)

    def _check_hook_references(self, model: nn.Module, params: list[nn.Parameter], batches: list[dict[str, torch.Tensor]] | None,
                               bank: _MemoryBank | None, selections: list[slice | torch.Tensor] | None) -> None:
        """Compare the hooked references with autograd's own (one backward per task), once per binding.

        The hooks see a weight only where its module's forward uses it: a model that also reads a
        hooked weight directly (``hidden @ module.weight.T`` outside the module) would lose that
        part of the gradient without notice. This comparison at the first step of every task turns
        that into a ``ValueError`` (and ``"auto"`` into the vmapped or per-task pass)."""
        if batches is None:
            batches = [bank.batch(rows) for rows in selections]
        expected = [torch.empty_like(view) for view in self._ref_views]
        reference_gradients_(model, params, batches, expected, method="per_task")
        exact = all(p.dtype in (torch.float32, torch.float64) for p in params)
        check_hooked(list(_named(model, params)), self._ref_views, expected, exact=exact, what="reference gradients",
                     against="autograd's", floor=1e-7)
        self._hooks_checked = True

    def _functional(self, model: nn.Module, params: list[nn.Parameter]) -> FunctionalModel:
        if self._forward is None or self._forward.model is not model:
            self._forward = FunctionalModel(model, _named(model, params))
        return self._forward

    def _vmap_references(self, model: nn.Module, params: list[nn.Parameter], stacked: dict[str, torch.Tensor]) -> None:
        _vmap_reference_gradients_(self._functional(model, params), stacked, self._ref_views, switch_to_eval=self._dropout)

    def _direct_references(self, model: nn.Module, params: list[nn.Parameter], batches: list[dict[str, torch.Tensor]]) -> None:
        """``"per_task"``: one forward/backward per batch, each writing its gradient straight into
        its row of the ``K x P`` buffer.

        The model runs with the aliases of :meth:`_bind` in its parameter slots, so ``p.grad``
        (the training gradient) is left alone and the backward accumulates into the aliases'
        ``.grad``, the zeroed reference views, instead of returning new tensors to copy
        (``torch.autograd.grad``). The numbers are those of :func:`reference_gradients_`.
        """
        forward = self._functional(model, params)
        if forward._generic:  # noqa: SLF001 - parametrized modules: the generic path
            return reference_gradients_(model, params, batches, self._ref_views, method="per_task")
        names = list(forward.params)
        weights = dict(zip(names, self._aliases))
        with _maybe_eval(model, self._dropout), torch.enable_grad(), swapped(forward._slots, weights):  # noqa: SLF001
            for k, batch in enumerate(batches):
                views = [view[k] for view in self._ref_views]
                torch._foreach_zero_(views)
                direct = [a.dtype == v.dtype for a, v in zip(self._aliases, views)]
                for alias, view, d in zip(self._aliases, views, direct):
                    alias.grad = view if d else None
                torch.autograd.backward(memory_losses(model, batch)[0], inputs=self._aliases)
                for alias, view, d in zip(self._aliases, views, direct):
                    if not d and alias.grad is not None:  # bf16 weights: their gradient is copied
                        view.copy_(alias.grad)
                    alias.grad = None


    def _draw_seed(self) -> int:
        step = getattr(getattr(self.trainer, "state", None), "global_step", self.steps)
        task = len(self.memories)
        return self.config.seed + 1_000_003 * task + int(step)

    def num_references(self) -> int:
        """How many reference gradients each step uses (``K``)."""
        raise NotImplementedError

    def draw(self, bank: _MemoryBank, seed: int) -> list[slice | torch.Tensor]:
        """The memory rows of each of the ``K`` reference losses for this step."""
        raise NotImplementedError

    def project(self, g: torch.Tensor, refs: torch.Tensor, *,
                reduce: Callable[[torch.Tensor], Any] | None = None) -> bool | torch.Tensor:
        """Edit ``g`` in place against ``refs``; return False when it is surely unchanged.

        ``reduce`` (under FSDP2) sums local partial results over the ranks holding the other shards."""
        raise NotImplementedError

    # --- state: one Arrow folder per task's memory, the rest in JSON ------------------------------
    def save_state(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        folders = []
        for i, (task_id, rows) in enumerate(self.memories.items()):
            folder = f"{_MEMORY_DIR}/task-{i:03d}"
            rows.save_to_disk(str(directory / folder))
            folders.append({"task_id": task_id, "folder": folder})
        save_tensor_json_state({"memories": folders, "steps": self.steps, "projected_steps": self.projected_steps}, directory)

    def load_state(self, directory: str | os.PathLike) -> None:
        from ..state import CheckpointError, confined_path

        state = load_tensor_json_state(directory)
        memories = state.get("memories", [])
        if not isinstance(memories, list) or not all(isinstance(m, dict) and {"task_id", "folder"} <= set(m)
                                                     for m in memories):
            raise CheckpointError(f"The {self.name} state in {directory} is malformed: 'memories' must be a list of "
                                  "{task_id, folder} objects.")
        self.memories = {}
        for m in memories:
            # The folder comes from the checkpoint: it must name a memory inside this strategy's folder.
            folder = confined_path(directory, m["folder"], what=f"{self.name} memory folder")
            try:
                self.memories[m["task_id"]] = load_from_disk(str(folder))
            except FileNotFoundError as err:
                raise CheckpointError(f"The {self.name} memory of task {m['task_id']!r} ({folder}) is missing or "
                                      f"incomplete: {err}") from err
        self.steps = state.get("steps", 0)
        self._projected = state.get("projected_steps", 0)
        self._bank, self._binding = None, None


# --- GEM -------------------------------------------------------------------------------------------
@dataclass
class GEMConfig(EpisodicMemoryConfig):
    """Settings of :class:`GEM`.

    Args:
        memory_per_task (`int`): Training rows of each task kept in the episodic memory.
        margin (`float`): ``γ >= 0``, the lower bound of the dual variables (0.5 in the paper's
            code): when a constraint is violated, at least ``γ`` times every past task's gradient is
            added, which biases the step towards lowering the memory losses, not just keeping them.
        memory_batch_size (`int`, `"auto"` or `None`): Rows of each task's memory per reference
            gradient, drawn afresh every step. ``"auto"`` (default): a budget of half a training
            micro-batch (``per_device_train_batch_size // 2`` rows, :func:`auto_reference_rows`)
            split over the ``K`` past tasks, ``max(1, budget // K)`` rows each, so that the rows per
            step do not grow with ``K`` (1.8-2.1x plain fine-tuning at ``K = 5`` on CPU,
            docs/benchmarks.md; whole memory outside a trainer). Its forgetting matched the whole
            memory's on the synthetic suite and the natural-language stream (docs/strategies.md).
            ``None`` uses the whole memory at every step (as in the paper: with 64 rows
            per task and ``K`` past tasks, ``64 K`` rows of forward/backward per step, several
            times a training step). An int: that many rows of each task.
        reference_method (`str`): How the ``K`` reference gradients are computed (see
            :func:`reference_gradients_`):

            - ``"hooks"``: ONE plain forward and ONE backward over all the memory rows of the step;
              each past task's weight gradient is rebuilt from the layers' inputs and output
              gradients. Every trainable weight must be that of an ``nn.Linear``, ``Conv1D``,
              ``nn.LayerNorm`` or ``nn.Embedding`` (GPT-2; not Llama's RMSNorm). The first step
              after each binding compares the result with ``"per_task"``'s, which catches a model
              that reads one of those weights outside its layer.
            - ``"vmap"``: the ``K`` memory batches stacked into ``[K, g, L]`` tensors and ONE
              ``torch.func.vmap``-ped forward and ONE backward over them: the work of one pass
              over ``K x g`` rows in one call, so with a fixed total of memory rows per step the
              cost hardly grows with ``K``. Decoder-only (causal) LMs with right-padded rows only:
              the attention mask is dropped, which changes nothing there.
            - ``"per_task"``: one forward/backward per past task on its own rows. The same total
              work, but ``K`` calls, whose fixed costs dominate when each has few rows.
            - ``"batched"``: one forward over all memories and one ``is_grads_batched`` backward
              (few calls, but backward work that grows as ``K²``).
            - ``"auto"`` (default): from two past tasks on, ``"hooks"`` where it applies, else
              ``"vmap"`` where it applies, else (one past task, seq2seq models, left padding, or once
              both failed) ``"per_task"``.
        seed (`int`): Seed of the choice of memory rows and of the per-step draws.

    Example:

    >>> from clm_hf.strategies.gem import GEMConfig
    >>> config = GEMConfig(memory_per_task=32, memory_batch_size=8)
    >>> config.margin, config.reference_method
    (0.5, 'auto')
    """

    aliases = {"gamma": "margin", "memory_strength": "margin", "n_memories": "memory_per_task"}

    margin: float = field(default=0.5, metadata={"help": "Margin γ: lower bound of the dual variables."})
    memory_batch_size: int | str | None = field(
        default=AUTO, metadata={"help": "Memory rows per task per step ('auto': half a micro-batch split over the tasks; None: all)."}
    )
    reference_method: str = field(
        default="auto", metadata={"help": "'auto' (hooks, else vmap, where they apply, else per_task), 'hooks', 'vmap', "
                                          "'per_task' or 'batched'."}
    )

    def validate(self) -> None:
        super().validate()
        check_range("margin", self.margin, low=0.0)
        _check_rows("memory_batch_size", self.memory_batch_size, allow_none=True)
        if self.reference_method not in REFERENCE_METHODS:
            raise ValueError(f"reference_method must be one of {', '.join(REFERENCE_METHODS)}; got {self.reference_method!r}.")


@register_strategy
class GEM(EpisodicGradientStrategy):
    """Gradient Episodic Memory: never let a step raise the loss of a past task's memory (to first order).

    One reference gradient per past task; when the update conflicts with any of them it is replaced
    by the closest update that conflicts with none (a ``K``-variable QP solved exactly). Clipping
    comes after the projection, so ``max_grad_norm`` bounds the projected step.

    Args:
        config ([`GEMConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf.strategies.gem import GEM
    >>> gem = GEM(memory_per_task=32, margin=0.5)
    >>> gem.name, gem.config.memory_batch_size
    ('gem', 'auto')

    Reference: Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS 2017,
    https://arxiv.org/abs/1706.08840.
    """

    name = "gem"
    config_class = GEMConfig

    def num_references(self) -> int:
        return len(self.memories)

    def rows_per_task(self) -> int | None:
        """Memory rows of each past task per step (``None``: all of them), ``"auto"`` resolved."""
        size = self.config.memory_batch_size
        if size == AUTO:
            budget = auto_reference_rows(self.trainer)
            return None if budget is None else max(1, budget // max(1, len(self.memories)))
        return size

    def draw(self, bank: _MemoryBank, seed: int) -> list[slice | torch.Tensor]:
        size = self.rows_per_task()
        generator = torch.Generator().manual_seed(seed)
        selections = []
        for k in range(len(self.memories)):
            rows = bank.task_rows(k)
            if size is not None and rows.stop - rows.start > size:
                rows = rows.start + torch.randperm(rows.stop - rows.start, generator=generator)[:size]
            selections.append(rows)
        return selections

    def project(self, g: torch.Tensor, refs: torch.Tensor, *, reduce: Callable[[torch.Tensor], Any] | None = None) -> bool:
        return project_gem_(g, refs, self.config.margin, reduce=reduce)


# --- A-GEM -----------------------------------------------------------------------------------------
@dataclass
class AGEMConfig(EpisodicMemoryConfig):
    """Settings of :class:`AGEM`.

    Args:
        memory_per_task (`int`): Training rows of each task kept in the episodic memory.
        sample_size (`int` or `"auto"`): Rows drawn each step from the whole memory (all past
            tasks pooled) for the reference gradient, 128 by default. ``"auto"``: half a training
            micro-batch, ``per_device_train_batch_size // 2`` (:func:`auto_reference_rows`; the
            whole memory outside a trainer), which keeps the step near 1.5x plain fine-tuning; the
            reference pass costs about ``sample_size / per_device_train_batch_size`` of a step (its
            quality is not yet measured, so it is not the default).
        margin (`float`): ``γ >= 0``. ``0`` (default) is the A-GEM paper's exact rule: only the
            conflicting component of ``g`` is removed. ``γ > 0`` is a variant that borrows GEM's
            margin for the single pooled constraint: a violating step gets at least ``γ · g_ref``
            added, however small the violation. On the demo stream (Adam) the paper's rule left
            forgetting where plain fine-tuning has it (BWT -0.52 for both), while ``0.5`` brought
            BWT to about -0.3 (measured before the projection moved ahead of clipping).
        seed (`int`): Seed of the choice of memory rows and of the per-step draws.

    Example:

    >>> from clm_hf.strategies.gem import AGEMConfig
    >>> AGEMConfig(sample_size="auto").sample_size, AGEMConfig().margin
    ('auto', 0.0)
    """

    aliases = {"n_memories": "memory_per_task", "memory_batch_size": "sample_size"}

    sample_size: int | str = field(default=128, metadata={"help": "Pooled memory rows per reference gradient ('auto': half a micro-batch)."})
    margin: float = field(default=0.0, metadata={"help": "0: the paper's rule; γ > 0: GEM's margin for the one constraint."})

    def validate(self) -> None:
        super().validate()
        _check_rows("sample_size", self.sample_size, allow_none=False)
        check_range("margin", self.margin, low=0.0)


@register_strategy
class AGEM(EpisodicGradientStrategy):
    """Averaged GEM: project the update against the gradient of a random sample of the whole memory.

    One reference gradient per step whatever the number of tasks, and a closed-form projection that
    needs no host synchronisation. The default ``margin=0`` is the paper's exact rule (which never
    lengthens the update); ``margin > 0`` is GEM's margin for the one constraint, a variant.

    Args:
        config ([`AGEMConfig`], *optional*): Or pass its fields as keyword arguments.

    Example:

    >>> from clm_hf.strategies.gem import AGEM
    >>> agem = AGEM(memory_per_task=32, sample_size=16)
    >>> agem.name, agem.config.sample_size
    ('agem', 16)

    Reference: Chaudhry et al., *Efficient Lifelong Learning with A-GEM*, ICLR 2019,
    https://arxiv.org/abs/1812.00420.
    """

    name = "agem"
    config_class = AGEMConfig

    def num_references(self) -> int:
        return 1

    def draw(self, bank: _MemoryBank, seed: int) -> list[slice | torch.Tensor]:
        # All past tasks pooled into the one reference loss.
        size = self.config.sample_size
        if size == AUTO:
            size = auto_reference_rows(self.trainer) or bank.num_rows
        if size >= bank.num_rows:
            return [slice(0, bank.num_rows)]
        generator = torch.Generator().manual_seed(seed)
        return [torch.randperm(bank.num_rows, generator=generator)[:size]]

    def project(self, g: torch.Tensor, refs: torch.Tensor, *, reduce: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        return project_agem_(g, refs[0], self.config.margin, reduce=reduce)
