"""Strategy state that lives where DeepSpeed ZeRO-3's partitioned parameters live, and ZeRO-2's
partitioned gradients as gradient-editing strategies see them (:class:`Zero2GradientPartition`,
:func:`hook_zero2_step`, at the end of this module).

Under ZeRO-3 every parameter is partitioned across the ``W`` data-parallel ranks: outside a
module's forward and backward, ``param.data`` is an empty placeholder, and rank ``r`` holds
``param.ds_tensor``, the flat slice ``[r·P, (r+1)·P)`` of the flattened parameter (``P =
param.ds_tensor.ds_numel``, the last partition padded). A strategy keeps its per-parameter state
(EWC's Fisher and anchor) as the same flat slices, so each rank holds ``1/W`` of it, and
reaches the whole parameter only where ZeRO-3 gathers it: inside the forward of the module that
owns it (:class:`Zero3QuadraticPenalty`), or inside :func:`gathered_without_hooks`. Outside
ZeRO-3 nothing here is used: :func:`zero3_parameters` is empty and the strategies keep their
plain code paths.

>>> import torch
>>> from clm_hf.deepspeed_support import is_zero3_param, zero3_parameters
>>> p = torch.nn.Parameter(torch.ones(3))
>>> is_zero3_param(p), zero3_parameters({"w": p})
(False, [])
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["Zero2GradientPartition", "Zero2MasterPartition", "Zero3QuadraticPenalty", "gather_partition",
           "gathered_without_hooks", "hook_zero2_step", "is_zero3_param", "is_zero3_run", "partition_range",
           "slice_partition", "zero3_parameters"]


def is_zero3_param(param: object) -> bool:
    """True when ``param`` is partitioned by DeepSpeed ZeRO-3 (it carries ``ds_id`` and ``ds_tensor``)."""
    return hasattr(param, "ds_id") and getattr(param, "ds_tensor", None) is not None


def is_zero3_run(trainer: object) -> bool:
    """True when ``trainer`` trains with DeepSpeed ZeRO-3 (from Accelerate's plugin or a ``--deepspeed`` JSON file).

    Known when the trainer is built, before any parameter is partitioned.
    """
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    ds_config = getattr(plugin, "hf_ds_config", None)
    return getattr(plugin, "zero_stage", None) == 3 or bool(getattr(ds_config, "is_zero3", lambda: False)())


def zero3_parameters(params: dict[str, torch.Tensor] | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The ZeRO-3 partitioned parameters among ``params`` (empty outside ZeRO-3)."""
    values = params.values() if isinstance(params, dict) else params
    return [p for p in values if is_zero3_param(p)]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def partition_range(param: torch.Tensor) -> tuple[int, int]:
    """``(start, end)`` of this rank's partition in the flattened parameter, without the padding.

    ZeRO-3 gives rank ``r`` the elements ``[r·P, (r+1)·P)`` (``P = param.ds_tensor.ds_numel``); the
    last rank's partition may run past ``param.ds_numel`` (padding), and may even be all padding.
    """
    size = int(param.ds_tensor.ds_numel)
    rank, _ = _rank_world()
    start = min(rank * size, int(param.ds_numel))
    return start, min(start + size, int(param.ds_numel))


def slice_partition(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's flat slice (a copy) of ``whole``, a tensor shaped like the whole ``param``.

    Raises:
        ValueError: ``whole`` does not have the parameter's whole shape (``param.ds_shape``).
    """
    if tuple(whole.shape) != tuple(param.ds_shape):
        raise ValueError(f"slice_partition: the tensor has shape {tuple(whole.shape)}, the ZeRO-3 parameter "
                         f"{tuple(param.ds_shape)}.")
    start, end = partition_range(param)
    return whole.reshape(-1)[start:end].clone()


def gather_partition(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor, shaped like ``param``, from every rank's flat slice ``local`` (a collective).

    Every rank must call it, for the same parameters in the same order.
    """
    import torch.distributed as dist

    _, world = _rank_world()
    size = int(param.ds_tensor.ds_numel)
    padded = torch.zeros(size, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local.reshape(-1)
    if world == 1:
        parts = [padded]
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    return torch.cat(parts)[: int(param.ds_numel)].view(tuple(param.ds_shape))


@contextlib.contextmanager
def gathered_without_hooks(model: nn.Module) -> Iterator[nn.Module]:
    """Gather every parameter of ``model`` whole on every rank, with the modules' forward hooks off.

    Inside the block the model behaves as an ordinary unpartitioned module: ``torch.func`` can call
    it with swapped weights (DeepSpeed's forward hooks would try to fetch and release those as
    partitioned parameters), and nothing is re-partitioned after each module's forward. The whole
    model is gathered at once (``deepspeed.zero.GatheredParameters`` over all parameters): simple,
    and what a vmapped per-row gradient over the whole model needs, but it holds the whole model on
    every rank for the duration. On exit the hooks are put back and the parameters re-partitioned
    (modifier_rank None: changes made inside are dropped). A collective: every rank enters it.
    """
    import deepspeed

    modules = list(model.modules())
    saved = [(m._forward_pre_hooks, m._forward_hooks) for m in modules]
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for m in modules:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
        try:
            yield model
        finally:
            for m, (pre, post) in zip(modules, saved):
                m._forward_pre_hooks, m._forward_hooks = pre, post


class _PartitionTerm(torch.autograd.Function):
    """``scale · Σ F (θ − θ*)²`` over this rank's slice of a gathered ZeRO-3 parameter.

    The gradient is ``world · 2 · scale · F (θ − θ*)`` on the slice and 0 elsewhere: ZeRO-3
    averages the ranks' gradients while reduce-scattering them into the partitions, and only
    this rank contributes to its own slice, so the average is the penalty's exact gradient.
    """

    @staticmethod
    def forward(ctx, param: torch.Tensor, fisher: torch.Tensor, anchor: torch.Tensor, start: int, scale: float,
                world: int) -> torch.Tensor:
        theta = param.detach().reshape(-1)[start : start + fisher.numel()].float()
        diff = theta - anchor.float()
        pull = diff * fisher.float()
        ctx.save_for_backward(pull)
        ctx.start, ctx.factor = start, 2.0 * scale * world
        ctx.numel, ctx.shape, ctx.dtype = param.numel(), param.shape, param.dtype
        return torch.dot(diff, pull) * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (pull,) = ctx.saved_tensors
        grad = torch.zeros(ctx.numel, dtype=ctx.dtype, device=pull.device)
        grad[ctx.start : ctx.start + pull.numel()] = (pull * (grad_output * ctx.factor)).to(ctx.dtype)
        return grad.view(ctx.shape), None, None, None, None, None


class Zero3QuadraticPenalty:
    """``scale · Σ F (θ − θ*)²`` on ZeRO-3 partitioned parameters, with F and θ* held as this rank's slices.

    Outside forward a rank has no weights to compare with θ*; inside a module's forward ZeRO-3 has
    gathered that module's own parameters. So a forward hook on each module that owns a penalised
    parameter (put before DeepSpeed's own post-forward hook, which re-partitions them) adds the
    module's term from this rank's slice of the gathered weight, and :meth:`penalty` sums the
    terms after the model's forward: every rank's loss carries the whole penalty (the local sums,
    all-reduced), while its gradient reaches only this rank's slice, which ZeRO-3's reduce-scatter
    then averages into the partition (:class:`_PartitionTerm`). Terms are collected only in a
    training forward with gradients on (not in evaluation, not in a Fisher estimate).

    Args:
        model (`nn.Module`): The unwrapped model (the DeepSpeed engine's ``module``).
        params (`list[nn.Parameter]`): The penalised ZeRO-3 parameters.
        fishers (`list[torch.Tensor]`): This rank's flat slice of each parameter's F.
        anchors (`list[torch.Tensor]`): This rank's flat slice of each parameter's θ*.

    Example:

    >>> import torch
    >>> pen = Zero3QuadraticPenalty(torch.nn.Linear(2, 2), [], [], [])  # no ZeRO-3 parameter: nothing hooked
    >>> float(pen.penalty(1.0)), pen.remove()
    (0.0, None)
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], fishers: list[torch.Tensor],
                 anchors: list[torch.Tensor]) -> None:
        _, self.world = _rank_world()
        by_id = {id(p): (p, f, a, partition_range(p)[0]) for p, f, a in zip(params, fishers, anchors)}
        self._terms: list[torch.Tensor] = []
        self._scale = 1.0
        self._handles = []
        owners: dict[int, list] = {}
        seen: set[int] = set()
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) in by_id and id(param) not in seen:
                    seen.add(id(param))
                    owners.setdefault(id(module), [module, []])[1].append(by_id[id(param)])
        self.hooked = len(seen)
        # The root's pre-hook starts each forward with no terms: a forward that did not reach the loss
        # (an aborted step, a recomputation) must not leave its terms to the next one.
        self._handles.append(model.register_forward_pre_hook(lambda *_: self._terms.clear(), prepend=True))
        for module, entries in owners.values():
            self._handles.append(module.register_forward_hook(self._hook(entries), prepend=True))

    def _hook(self, entries):
        def hook(module, args, output):
            if not (module.training and torch.is_grad_enabled()):
                return
            for param, fisher, anchor, start in entries:
                if fisher.numel():  # a partition of padding only has no term
                    self._terms.append(_PartitionTerm.apply(param, fisher, anchor, start, 1.0, self.world))

        return hook

    def penalty(self, scale: float) -> torch.Tensor:
        """``scale`` times the whole penalty of the last training forward (its gradient: this rank's slices)."""
        if not self._terms:
            local = torch.zeros(())
        else:
            local = torch.stack(self._terms).sum()
        self._terms = []
        total = local.detach().clone()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        # The value of the whole penalty, the gradient of this rank's part only.
        return (local + (total - local.detach())) * scale

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --- ZeRO-2: this rank's partition of the reduced gradient, inside the optimizer step -------------
def _partition_pieces(optimizer) -> tuple[list[tuple[torch.Tensor, int, int, int]], list[tuple[int, int]]]:
    """Where each parameter's slice lies in this rank's ZeRO-2 partition, the groups' partitions end to end.

    Returns ``(pieces, spans)``: a piece is ``(param, first element of its slice in the flattened
    param, first element in the flat vector, length)`` (ZeRO's ``grad_start_offset`` /
    ``grad_partition_insertion_offset``), a span ``(offset, size)`` is a parameter group's partition
    in the flat vector. The same layout holds for the reduced gradient and the fp32 master weights.
    """
    import torch.distributed as dist

    cached = getattr(optimizer, "_clm_hf_partition_layout", None)
    if cached is not None:  # fixed for the engine's life: walked once, not at every step and group
        return cached
    distributed = dist.is_available() and dist.is_initialized()
    pieces: list[tuple[torch.Tensor, int, int, int]] = []
    spans: list[tuple[int, int]] = []
    offset = 0
    for i, params in enumerate(optimizer.params_in_partition):
        size = int(optimizer.partition_size[i])
        rank = dist.get_rank(group=optimizer.real_dp_process_group[i]) if distributed else 0
        starts = optimizer.grad_start_offset[i][rank]
        inserts = optimizer.grad_partition_insertion_offset[i][rank]
        for param in params:
            key = optimizer.get_param_id(param)
            source, dest = int(starts[key]), int(inserts[key])
            count = min(param.numel() - source, size - dest)
            if count > 0:
                pieces.append((param, source, offset + dest, count))
        spans.append((offset, size))
        offset += size
    optimizer._clm_hf_partition_layout = pieces, spans
    return pieces, spans


class _PartitionSlices:
    """What the gradient and master views of a ZeRO-2 partition share: :attr:`pieces` and cutting tensors like them."""

    # (param, first element of its slice in the flattened param, first element in the flat vector, length)
    pieces: list[tuple[torch.Tensor, int, int, int]]

    def slice_rows(self, whole: list[torch.Tensor], params: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out[:, a:a+n]`` <- the rows of ``whole`` (``K x *param.shape`` each) cut like this partition.

        ``whole[j]`` belongs to ``params[j]``; ``out`` is ``K x numel`` and is zeroed first (padding
        and parameters that are not trained stay 0). Returns ``out``.
        """
        index = {id(p): j for j, p in enumerate(params)}
        out.zero_()
        for param, source, dest, count in self.pieces:
            j = index.get(id(param))
            if j is not None:
                rows = whole[j].reshape(whole[j].shape[0], -1)
                out[:, dest : dest + count] = rows[:, source : source + count]
        return out


class Zero2GradientPartition(_PartitionSlices):
    """This rank's partition of the reduced gradient, at the start of DeepSpeed ZeRO-2's optimizer step.

    ZeRO-2 keeps whole parameters on every rank but reduce-scatters the gradients during backward:
    rank ``r`` ends the backward holding only its partition of each parameter group's flattened
    gradient, as the list ``optimizer.averaged_gradients[i]`` (pieces of parameters, and zero
    padding, which concatenated give the flat partition). ``step()`` then takes the global norm of
    those pieces, clips (and unscales) them, flattens them into the fp32 master partition and
    steps. An edit of the pieces made before ``step()`` starts (:func:`hook_zero2_step`) is
    therefore what the optimizer uses, and clipping bounds the edited gradient, as the trainer
    orders it without DeepSpeed (edits first, then clipping).

    The partition is seen as one flat vector: the parameter groups' partitions one after the other
    (:attr:`numel` numbers). :attr:`pieces` says where each parameter's slice lies in it.

    Args:
        optimizer: The engine's ``DeepSpeedZeroOptimizer`` (stage 2, no CPU offload).

    Example (the attributes of a one-rank ZeRO-2 optimizer holding a 2 x 2 weight and a bias of 2):

    >>> from types import SimpleNamespace
    >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    >>> ids = {id(w): 0, id(b): 1}
    >>> opt = SimpleNamespace(params_in_partition=[[w, b]], partition_size=[6], real_dp_process_group=[None],
    ...                       grad_start_offset=[{0: {0: 0, 1: 0}}], grad_partition_insertion_offset=[{0: {0: 0, 1: 4}}],
    ...                       get_param_id=lambda p: ids[id(p)], loss_scale=1.0,
    ...                       averaged_gradients={0: [torch.arange(4.0).view(2, 2), torch.tensor([4.0, 5.0])]})
    >>> part = Zero2GradientPartition(opt)
    >>> part.read().tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    >>> part.write(torch.zeros(6)); opt.averaged_gradients[0][1].tolist()
    [0.0, 0.0]
    """

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.group = getattr(optimizer, "dp_process_group", None)
        self.scale = float(getattr(optimizer, "loss_scale", 1.0))
        self.pieces, spans = _partition_pieces(optimizer)
        self._tensors: list[tuple[list[torch.Tensor], int, int]] = []  # (pieces of a group, its offset, its size)
        for i, (offset, size) in enumerate(spans):
            tensors = optimizer.averaged_gradients.get(i)
            if tensors is None:
                raise RuntimeError(f"DeepSpeed ZeRO-2 holds no reduced gradient for parameter group {i} at its "
                                   f"optimizer step (averaged_gradients[{i}] is None); cannot edit it.")
            self._tensors.append((list(tensors), offset, size))
        self.numel = sum(size for _, size in spans)

    def read(self) -> torch.Tensor:
        """The flat partition as a new float32 vector, divided by the loss scale (fp16): the true gradient."""
        device = self._tensors[0][0][0].device if self._tensors and self._tensors[0][0] else torch.device("cpu")
        flat = torch.zeros(self.numel, dtype=torch.float32, device=device)
        for piece, at in self._segments():
            flat[at : at + piece.numel()] = piece
        if self.scale != 1.0:
            flat.div_(self.scale)
        return flat

    def write(self, flat: torch.Tensor) -> None:
        """Put ``flat`` (a vector like :meth:`read`'s) back into DeepSpeed's pieces, in place, scaled again."""
        if self.scale != 1.0:
            flat = flat * self.scale
        for piece, at in self._segments():
            piece.copy_(flat[at : at + piece.numel()].to(piece.dtype))

    def _segments(self):
        """``(flat view of the part of a DeepSpeed piece inside the partition, its start in the flat vector)``."""
        for tensors, offset, size in self._tensors:
            at = offset
            for tensor in tensors:
                n = min(tensor.numel(), offset + size - at)
                if n > 0:
                    yield tensor.view(-1)[:n], at
                at += n


    def all_reduce_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the data-parallel ranks of ``partial`` (a collective; a new tensor)."""
        import torch.distributed as dist

        total = partial.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group=self.group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def overflowed(self) -> bool:
        """Whether some rank's scaled fp16 gradient is not finite (DeepSpeed will skip this step).

        Only fp16 runs (a loss scale) can overflow; elsewhere False without communication.
        """
        if getattr(self.optimizer, "dtype", None) != torch.float16:
            return False
        bad = torch.zeros((), dtype=torch.float32)
        for tensors, _, _ in self._tensors:
            for tensor in tensors:
                if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                    bad += 1
        return bool(self.all_reduce_sum(bad.to(self._tensors[0][0][0].device)) > 0)


class Zero2MasterPartition(_PartitionSlices):
    """This rank's fp32 master weights of one parameter group, right after ZeRO-2's inner optimizer stepped them.

    The model's weights are not what DeepSpeed ZeRO-2 updates: each rank keeps the fp32 master copy
    of its partition of every parameter group (``optimizer.single_partition_of_fp32_groups[i]``,
    the inner optimizer's one flat parameter), steps it, copies it into its partition of the
    model's weights and all-gathers the partitions into the whole weights. A value written into
    the model's weights after the step is overwritten by the next step's copy; a strategy that holds
    weights at fixed values (PackNet) writes them here instead (:func:`hook_zero2_step`'s
    ``after_step``), and the copy and all-gather then bring them into every rank's model.

    Attributes:
        weights (`torch.Tensor`): The flat master partition of the group (``numel`` elements, fp32),
            to edit in place.
        pieces: ``(param, first element of its slice in the flattened param, first element in
            weights, length)`` for each parameter of the group in this partition, as
            :class:`Zero2GradientPartition`'s; :meth:`slice_rows` cuts whole tensors like it.

    Args:
        optimizer: The engine's ``DeepSpeedZeroOptimizer`` (stage 2, no CPU offload).
        group_no (`int`): The parameter group the inner optimizer just stepped.

    Example (the attributes of a one-rank ZeRO-2 optimizer holding a 2 x 2 weight and a bias of 2):

    >>> from types import SimpleNamespace
    >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    >>> ids = {id(w): 0, id(b): 1}
    >>> opt = SimpleNamespace(params_in_partition=[[w, b]], partition_size=[6], real_dp_process_group=[None],
    ...                       grad_start_offset=[{0: {0: 0, 1: 0}}], grad_partition_insertion_offset=[{0: {0: 0, 1: 4}}],
    ...                       get_param_id=lambda p: ids[id(p)], single_partition_of_fp32_groups=[torch.zeros(6)])
    >>> master = Zero2MasterPartition(opt, 0)
    >>> held = master.slice_rows([torch.eye(2).bool()[None], torch.zeros(1, 2, dtype=torch.bool)], [w, b],
    ...                          torch.empty(1, master.numel, dtype=torch.bool))[0]
    >>> _ = master.weights.masked_fill_(held, 7.0); opt.single_partition_of_fp32_groups[0].tolist()
    [7.0, 0.0, 0.0, 7.0, 0.0, 0.0]
    """

    def __init__(self, optimizer, group_no: int) -> None:
        self.optimizer = optimizer
        self.group_no = group_no
        pieces, spans = _partition_pieces(optimizer)
        offset, self.numel = spans[group_no]
        self.weights: torch.Tensor = optimizer.single_partition_of_fp32_groups[group_no].detach().view(-1)
        self.pieces = [(param, source, dest - offset, count) for param, source, dest, count in pieces
                       if offset <= dest < offset + self.numel]


def hook_zero2_step(optimizer: Any, edit: Callable[[Zero2GradientPartition], None] | None = None,
                    after_step: Callable[[Zero2MasterPartition], None] | None = None) -> None:
    """Make DeepSpeed ZeRO-2's ``optimizer.step()`` call ``edit`` first, and ``after_step`` after each group's update.

    DeepSpeed runs its optimizer step inside ``engine.step()``, right after the backward of the
    last micro-batch of an optimizer step, before the Trainer's own step events; its start is the
    one moment this rank's reduced gradient partition exists before the update, and it is given to
    ``edit`` as a :class:`Zero2GradientPartition`. Inside the step, for each parameter group, the
    inner optimizer updates the fp32 master partition, which DeepSpeed then copies into the model's
    weights (and all-gathers after the last group): ``after_step`` is called in between, with
    that group's :class:`Zero2MasterPartition`, under ``torch.no_grad()``. A step DeepSpeed skips
    (an fp16 overflow) updates nothing and calls no ``after_step``. The hooks are put on the
    instance (a new engine, with a new optimizer, is built for each task), so hooking twice
    replaces the first hooks.

    Args:
        optimizer: The engine's optimizer.
        edit (`Callable`, *optional*): Called with the gradient partition at every optimizer step, on every rank.
        after_step (`Callable`, *optional*): Called with each group's master partition after its
            update, on every rank.

    Raises:
        NotImplementedError: The optimizer is not ZeRO-2's ``DeepSpeedZeroOptimizer``, or offloads
            its state to the CPU (the gradient then goes straight into the offloaded fp32 copy).
        RuntimeError: At a step (not skipped) whose groups did not all pass through ``after_step``.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not getattr(optimizer, "partition_gradients", False):
        raise NotImplementedError(f"Editing gradients or master weights under DeepSpeed needs ZeRO stage 2 (DeepSpeedZeroOptimizer with "
                                  f"partitioned gradients); the engine's optimizer is {type(optimizer).__name__}.")
    if getattr(optimizer, "cpu_offload", False):
        raise NotImplementedError("Editing gradients or master weights under DeepSpeed ZeRO-2 is not supported with "
                                  "offload_optimizer: "
                                  "the reduced gradient goes straight into the CPU copy. Turn the offload off.")
    step = type(optimizer).step
    held: list[int] = []  # the groups whose master partition after_step saw during this step
    # The hooks live in the optimizer's own __dict__: holding it weakly keeps that from being a
    # reference cycle, so a finished task's optimizer (its fp32 master and Adam state) is freed as
    # soon as the Trainer drops it, not at some later garbage collection.
    this = weakref.ref(optimizer)

    def hooked(closure=None):
        optimizer = this()
        if edit is not None:
            edit(Zero2GradientPartition(optimizer))
        held.clear()
        result = step(optimizer, closure)
        if after_step is not None and not getattr(optimizer, "overflow", False) and len(held) != len(optimizer.bit16_groups):
            # _optimizer_step is DeepSpeed's private per-group update: a release that stops calling it
            # from step() would otherwise lose the edit of the master weights without a word.
            raise RuntimeError(f"DeepSpeed ZeRO-2's step updated {len(optimizer.bit16_groups)} parameter group(s) but "
                               f"_optimizer_step ran for {len(held)}: this DeepSpeed version no longer updates each group "
                               "there, so the strategy's edit of the fp32 master weights would be lost.")
        return result

    optimizer.step = hooked
    if after_step is not None:
        # step() runs self._optimizer_step(i) for each group, then copies the group's fp32 master
        # partition into the model's partition: the one point between the update and that copy.
        group_step = type(optimizer)._optimizer_step

        def stepped(group_no):
            optimizer = this()
            group_step(optimizer, group_no)
            with torch.no_grad():
                after_step(Zero2MasterPartition(optimizer, group_no))
            held.append(group_no)

        optimizer._optimizer_step = stepped
