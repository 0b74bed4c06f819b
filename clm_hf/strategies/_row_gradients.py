"""Per-group weight gradients from ONE plain forward and ONE backward, rebuilt layer by layer.

Shared by GEM's reference gradients (``K`` groups of memory rows, each group's gradient written into
its row of a ``K x P`` buffer) and EWC's Fisher (one group per row, each row's gradient squared and
summed straight into the Fisher totals). The pass is the same; only what consumes each layer's
per-group gradient differs (a :class:`RowGradientSink`).

How: every trainable weight must be the ``weight`` or ``bias`` of a module of a known type
(:func:`row_gradient_modules`). A forward hook records the input and the output of every call of
those modules, and the backward asks autograd for the gradients of the outputs only, not of the
weights: the activation half of an ordinary backward. When the loss is a sum of per-group terms,
each depending only on its own rows, group ``k``'s weight gradient is the sum over its rows of the
per-layer products: for a linear layer ``Σ dYᵀX`` (one batched matmul over the groups), for a layer
norm ``Σ dY · x̂``, for an embedding a scatter-add of ``dY`` at the group's token ids.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import eval_mode, unwrap_model


def _hookable_types() -> dict[type, str]:
    """The exact module types whose weight gradient is rebuilt from the layer's input and output gradient."""
    types: dict[type, str] = {nn.Linear: "linear", nn.Embedding: "embedding", nn.LayerNorm: "layer_norm"}
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer
    except ImportError:  # pragma: no cover - transformers always has it
        return types
    types[Conv1D] = "conv1d"
    return types


def row_gradient_modules(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[nn.Module, dict[str, int]]:
    """The modules holding the trainable ``params``, as ``{module: {"weight" | "bias": index in params}}``.

    Every slot of every trainable parameter must be the ``weight`` or ``bias`` of a module of exactly
    one of the types :func:`hooked_group_gradients` knows (``nn.Linear``, GPT-2's ``Conv1D``,
    ``nn.LayerNorm``, a dense ``nn.Embedding``): their forward is known, so the gradient of the
    weights of each group of rows can be rebuilt from the layer's input and the gradient of its output.

    Args:
        model (`nn.Module`): The (unwrapped) model.
        params (`dict[str, nn.Parameter]`): The trainable parameters by name, in buffer order.

    Returns:
        `dict`: The modules to hook, each with the trainable parameters it holds.

    Raises:
        ValueError: Naming the first parameter held by a module of another type (a subclass too:
            its forward may differ), or an embedding whose backward is not a plain scatter.

    Example:

    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> model = build_tiny_model("gpt2", build_tokenizer())
    >>> named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    >>> len(row_gradient_modules(model, named)) > 0
    True
    """
    types = _hookable_types()
    index = {id(p): i for i, p in enumerate(params.values())}
    names = list(params)
    modules: dict[nn.Module, dict[str, int]] = {}
    for module_name, module in unwrap_model(model).named_modules():
        for attr, value in module._parameters.items():  # noqa: SLF001 - every slot, tied ones included
            if value is None or id(value) not in index:
                continue
            where = f"{names[index[id(value)]]!r} (slot {module_name}.{attr}, a {type(module).__name__})"
            if type(module) not in types or attr not in ("weight", "bias"):
                raise ValueError(f"The trainable parameter {where} is not the weight or bias of an nn.Linear, Conv1D, "
                                 "nn.LayerNorm or nn.Embedding.")
            if type(module) is nn.Embedding and (module.max_norm is not None or module.sparse or module.scale_grad_by_freq):
                raise ValueError(f"The embedding {where} uses max_norm, sparse or scale_grad_by_freq.")
            modules.setdefault(module, {})[attr] = index[id(value)]
    covered = {i for slots in modules.values() for i in slots.values()}
    if len(covered) != len(params):
        missing = [names[i] for i in range(len(names)) if i not in covered]
        raise ValueError(f"The trainable parameters {missing[:3]} are not held by any module.")
    return modules


def _maybe_eval(model: nn.Module, switch: bool):
    """``eval_mode(model)``, or nothing when ``switch`` is False: for a model without active dropout
    (:func:`~clm_hf.strategies.lwf.has_active_dropout`) the two modes compute the same thing, and
    the switch walks every module twice (half a millisecond per step on the tiny GPT-2)."""
    return eval_mode(model) if switch else contextlib.nullcontext()


def check_hooked(names: list[str], hooked: list[torch.Tensor], reference: list[torch.Tensor], *, exact: bool,
                 what: str, against: str, floor: float) -> None:
    """``ValueError`` naming the first tensor whose hooked value differs from the reference computation's.

    The hooks see a weight only where its module's forward uses it: a model that also reads a hooked
    weight directly (``hidden @ module.weight.T`` outside the module) would lose that part of the
    gradient without notice. GEM's references and EWC's Fisher compare their first hooked pass with
    autograd's (or the per-row loop's) through this, and ``"auto"`` falls back on the error.

    Args:
        names (`list[str]`): The parameter names, in the order of ``hooked`` and ``reference``.
        hooked, reference (`list[torch.Tensor]`): The two results, tensor by tensor.
        exact (`bool`): fp32/fp64 weights (relative tolerance 1e-3), else 16-bit ones (5e-2).
        what (`str`): What was hooked, for the message (``"Fisher"``, ``"reference gradients"``).
        against (`str`): What it is compared with, for the message.
        floor (`float`): Absolute error allowed on top of the relative one (for near-zero tensors).

    Example:

    >>> check_hooked(["w"], [torch.ones(2)], [torch.ones(2)], exact=True, what="Fisher", against="the loop's", floor=0.0)
    >>> check_hooked(["w"], [torch.zeros(2)], [torch.ones(2)], exact=True, what="Fisher", against="the loop's", floor=0.0)
    Traceback (most recent call last):
    ...
    ValueError: the hooked Fisher of 'w' differs from the loop's (error 1.41, norm 1.41): the model uses it outside its module.
    """
    tolerance = 1e-3 if exact else 5e-2  # float32 rounding, or that of 16-bit weights and activations
    verb = "differ" if what.endswith("s") else "differs"
    for name, got, want in zip(names, hooked, reference):
        error = float((got - want).norm())
        if not error <= tolerance * float(want.norm()) + floor:
            raise ValueError(f"the hooked {what} of {name!r} {verb} from {against} (error {error:.3g}, "
                             f"norm {float(want.norm()):.3g}): the model uses it outside its module.")


class RowGradientSink:
    """What :func:`hooked_group_gradients` does with each layer's per-group weight gradients.

    The pass calls :meth:`begin` once, with how many layer calls contribute to each parameter (a
    tied weight, or a module called twice, has several), then :meth:`add` / :meth:`add_embedding`
    once per contribution, then :meth:`finish`. Parameters are the indices of
    :func:`row_gradient_modules`' answer.
    """

    def begin(self, uses: dict[int, int]) -> None:
        """``uses[i]``: the number of contributions parameter ``i`` will get (absent: none)."""

    def add(self, i: int, value: torch.Tensor) -> None:
        """Add ``value``, the ``(groups, *shape)`` gradients of parameter ``i`` (a fresh tensor: the
        sink may overwrite it)."""
        raise NotImplementedError

    def add_embedding(self, i: int, ids: torch.Tensor, dy: torch.Tensor) -> None:
        """Add an embedding's gradients: group ``k``'s gradient is ``dy[k, j]`` scattered to row
        ``ids[k, j]`` of the weight (``ids`` is ``(groups, n)``, ``dy`` ``(groups, n, dim)``)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last contribution."""


def hooked_group_gradients(model: nn.Module, modules: dict[nn.Module, dict[str, int]], loss_of: Callable[[], torch.Tensor],
                           groups: int, total: int, sink: RowGradientSink, *, switch_to_eval: bool = True) -> None:
    """Run ``loss_of()`` (the forward of ``total`` rows through ``model``) and ONE backward, and hand
    ``sink`` every group's weight gradient, layer by layer.

    The rows are in group order, ``total / groups`` rows per group, and the loss returned must be a
    sum of per-group terms, each depending only on its own group's rows (padding rows that count
    nothing are fine). ``modules`` is :func:`row_gradient_modules`' answer.

    Args:
        model (`nn.Module`): The unwrapped model the hooks go on (``loss_of`` calls it).
        modules (`dict`): The hooked modules and the parameter indices they hold.
        loss_of (`Callable`): Runs the forward and returns the scalar loss.
        groups (`int`): Number of groups the rows form.
        total (`int`): Number of rows (a multiple of ``groups``).
        sink ([`RowGradientSink`]): Receives the per-group gradients.
        switch_to_eval (`bool`): Run the forward in eval mode (see :func:`_maybe_eval`).

    Raises:
        ValueError: A hooked module was called on something other than ``[rows, ...]`` batches, or
            its input or output was changed in place after the call.

    Example:

    >>> import torch
    >>> from clm_hf.tasks import build_tokenizer, build_tiny_model
    >>> model = build_tiny_model("gpt2", build_tokenizer()).eval()
    >>> named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    >>> class Sum(RowGradientSink):  # the sum over the groups, i.e. the batch gradient
    ...     def __init__(self): self.out = [torch.zeros_like(p) for p in named.values()]
    ...     def add(self, i, value): self.out[i] += value.sum(0)
    ...     def add_embedding(self, i, ids, dy): self.out[i].index_add_(0, ids.flatten(), dy.flatten(0, 1))
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    >>> sink = Sum()
    >>> hooked_group_gradients(model, row_gradient_modules(model, named),
    ...                        lambda: model(input_ids=ids, labels=ids).loss, 2, 2, sink)
    >>> model(input_ids=ids, labels=ids).loss.backward()
    >>> all(torch.allclose(s, p.grad, atol=1e-6) for s, p in zip(sink.out, named.values()))
    True
    """
    types = _hookable_types()
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int, int]] = []

    def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        if isinstance(output, torch.Tensor) and x.shape[0] == 1 and output.shape[0] == 1 and total > 1:
            # One row broadcast over the batch (GPT-2's position ids): the model gets it expanded
            # instead (the same numbers), so that its gradient comes back row by row.
            x, output = x.expand(total, *x.shape[1:]), output.expand(total, *output.shape[1:])
            records.append((module, x, output, x._version, output._version))
            return output
        records.append((module, x, output, x._version, getattr(output, "_version", 0)))
        return None

    handles = [module.register_forward_hook(record) for module in modules]
    try:
        with _maybe_eval(model, switch_to_eval), torch.enable_grad():
            loss = loss_of()
    finally:
        for handle in handles:
            handle.remove()
    for module, x, y, x_version, y_version in records:
        if not isinstance(y, torch.Tensor) or x.shape[0] != total or y.shape[0] != total or not y.requires_grad:
            raise ValueError(f"A {type(module).__name__} was called on tensors that are not [rows, ...] batches.")
        if x._version != x_version or y._version != y_version:
            raise ValueError(f"The input or output of a {type(module).__name__} was changed in place.")
    grads = torch.autograd.grad(loss, [r[2] for r in records], allow_unused=True)
    uses: dict[int, int] = {}
    for (module, _, _, _, _), dy in zip(records, grads):
        if dy is not None:
            for attr, i in modules[module].items():
                if types[type(module)] != "embedding" or attr == "weight":
                    uses[i] = uses.get(i, 0) + 1
    sink.begin(uses)
    with torch.no_grad():  # the inputs are activations of the graph: no graph for the products
        for (module, x, _, _, _), dy in zip(records, grads):
            if dy is None:
                continue
            slots, kind = modules[module], types[type(module)]
            if kind == "embedding":
                if "weight" in slots:
                    ids = x.reshape(groups, -1)
                    dy = dy.reshape(groups, ids.shape[1], -1)
                    if module.padding_idx is not None:  # F.embedding gives the padding row no gradient
                        dy = dy.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
                    sink.add_embedding(slots["weight"], ids, dy)
                continue
            if x.dtype != dy.dtype:  # autocast: the product in float32
                x, dy = x.float(), dy.float()
            dy = dy.reshape(groups, -1, dy.shape[-1])
            if kind == "layer_norm":
                shape = tuple(module.normalized_shape)
                if "weight" in slots:
                    normalized = F.layer_norm(x, shape, None, None, module.eps).reshape(groups, -1, *shape)
                    sink.add(slots["weight"], (dy.view(groups, -1, *shape) * normalized).sum(1))
                if "bias" in slots:
                    sink.add(slots["bias"], dy.view(groups, -1, *shape).sum(1))
                continue
            if "weight" in slots:
                x = x.reshape(groups, -1, x.shape[-1])
                # nn.Linear's weight is [out, in] (dYᵀX), Conv1D's [in, out] (XᵀdY).
                sink.add(slots["weight"], torch.bmm(dy.transpose(1, 2), x) if kind == "linear" else torch.bmm(x.transpose(1, 2), dy))
            if "bias" in slots:
                sink.add(slots["bias"], dy.sum(1))
        sink.finish()


class GroupBufferSink(RowGradientSink):
    """GEM's consumer: group ``k``'s gradient of parameter ``i`` goes to ``out[i][k]`` (views of a
    ``K x P`` buffer); a tied weight's contributions add, a parameter no path reaches is zeroed."""

    def __init__(self, out: list[torch.Tensor]) -> None:
        self.out = out
        self.written = [False] * len(out)

    def add(self, i: int, value: torch.Tensor) -> None:
        if self.written[i]:  # a tied weight: its second use adds
            self.out[i].add_(value)
        else:
            self.out[i].copy_(value)
            self.written[i] = True

    def add_embedding(self, i: int, ids: torch.Tensor, dy: torch.Tensor) -> None:
        if not self.written[i]:
            self.out[i].zero_()
            self.written[i] = True
        lanes = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        self.out[i].index_put_((lanes.flatten(), ids.flatten()), dy.flatten(0, 1).to(self.out[i].dtype), accumulate=True)

    def finish(self) -> None:
        for i, done in enumerate(self.written):
            if not done:  # no path from the loss: zero, as autograd's allow_unused gives
                self.out[i].zero_()


class SquareSumSink(RowGradientSink):
    """EWC's consumer (one group per row): every row's gradient of parameter ``i`` is squared and the
    squares summed over the rows into ``totals[i]`` (fp32), layer by layer: no rows x parameters buffer.

    Squares are of each row's whole gradient: a parameter with several contributions per row (a tied
    embedding / LM head) gets a ``(rows, *shape)`` buffer in which they are added first.
    """

    def __init__(self, totals: list[torch.Tensor]) -> None:
        self.totals = totals
        self.shared: set[int] = set()
        self.dense: dict[int, torch.Tensor] = {}
        self.scatters: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def begin(self, uses: dict[int, int]) -> None:
        self.shared = {i for i, count in uses.items() if count > 1}

    def add(self, i: int, value: torch.Tensor) -> None:
        value = value.float()
        if i not in self.shared:
            self.totals[i].add_(value.square_().sum(0))
        elif i in self.dense:
            self.dense[i].add_(value)
        else:
            self.dense[i] = value

    def add_embedding(self, i: int, ids: torch.Tensor, dy: torch.Tensor) -> None:
        if i in self.shared:  # scattered into the dense per-row sum at the end (no zero buffer if there is one)
            self.scatters.setdefault(i, []).append((ids, dy))
            return
        # A row's gradient at a token id is the sum over that row's positions holding it: sum per
        # distinct (row, id) pair, square, and add at the id (work of the row's tokens, not of rows x vocab).
        vocab = self.totals[i].shape[0]
        keys = (torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) * vocab + ids).flatten()
        distinct, inverse = torch.unique(keys, return_inverse=True)
        sums = dy.new_zeros(distinct.shape[0], dy.shape[-1], dtype=torch.float32)
        sums.index_add_(0, inverse, dy.flatten(0, 1).float())
        self.totals[i].index_add_(0, distinct % vocab, sums.square_())

    def finish(self) -> None:
        for i, pieces in self.scatters.items():
            buffer = self.dense.get(i)
            if buffer is None:
                buffer = self.dense[i] = torch.zeros(pieces[0][0].shape[0], *self.totals[i].shape, dtype=torch.float32,
                                                     device=self.totals[i].device)
            for ids, dy in pieces:
                lanes = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
                buffer.index_put_((lanes.flatten(), ids.flatten()), dy.flatten(0, 1).float(), accumulate=True)
        for i, buffer in self.dense.items():
            self.totals[i].add_(buffer.square_().sum(0))
        self.dense, self.scatters = {}, {}
