"""Helpers for strategy state that lives where FSDP2's sharded (DTensor) parameters live.

Under FSDP2 (``fully_shard``) every parameter of the model is a ``DTensor``: each rank holds one
shard (``Shard(0)`` over a 1-D device mesh), and gradients are sharded the same way after
backward. A strategy keeps its per-parameter state (EWC's Fisher and anchor, LwF's teacher) as
DTensors with the parameter's mesh and placements, computes on the local shards, and reduces only
scalars over the ranks. Outside FSDP every helper is the identity on a plain tensor, so the
unsharded code paths stay unchanged.

>>> import torch
>>> from clm_hf.sharding import is_dtensor, local_part, like_param, all_reduce_sum_like
>>> p = torch.nn.Parameter(torch.ones(3))
>>> is_dtensor(p), local_part(p) is p, like_param(torch.zeros(3), p).shape
(False, True, torch.Size([3]))
>>> float(all_reduce_sum_like(torch.tensor(2.0), p))  # one process: nothing to reduce
2.0
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["all_reduce_sum_like", "any_dtensor", "is_dtensor", "like_param", "local_part", "reshard", "shard_like",
           "shard_plain_modules"]


def is_dtensor(tensor: object) -> bool:
    """True when ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def any_dtensor(tensors: Iterable[object]) -> bool:
    """True when one of ``tensors`` is a DTensor: the model is sharded with FSDP2."""
    return any(is_dtensor(t) for t in tensors)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor, sharing its storage); a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap ``local`` (this rank's shard, shaped like ``local_part(param)``) as a DTensor sharded like ``param``.

    Returns ``local`` itself when ``param`` is a plain tensor. No communication: every rank passes
    its own shard, as FSDP2 laid the parameter out.

    Args:
        local (`torch.Tensor`): This rank's shard, e.g. a gradient or Fisher computed on ``local_part(param)``.
        param (`torch.Tensor`): The parameter (a DTensor under FSDP2) whose mesh and placements to use.

    Raises:
        ValueError: ``local`` is not shaped like this rank's shard of ``param``.

    >>> p = torch.nn.Parameter(torch.ones(2, 3))
    >>> like_param(torch.zeros(2, 3), p).sum().item()  # unsharded: ``local`` itself
    0.0
    """
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    if local.shape != param.to_local().shape:
        raise ValueError(f"like_param: the local shard has shape {tuple(local.shape)}, but this rank's shard of the "
                         f"parameter has shape {tuple(param.to_local().shape)}.")
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def all_reduce_sum_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` (a plain tensor, e.g. a partial sum over local shards) over the ranks of ``param``'s mesh.

    Returns a new tensor; with a plain ``param`` (unsharded model) ``value`` is returned as it is.
    A collective: every rank of the mesh must call it, in the same order.

    Args:
        value (`torch.Tensor`): A small plain tensor (a partial sum, a count).
        param (`torch.Tensor`): A parameter of the model; its device mesh names the ranks to sum over.

    >>> all_reduce_sum_like(torch.tensor([1.0, 2.0]), torch.nn.Parameter(torch.ones(1))).tolist()
    [1.0, 2.0]
    """
    if not is_dtensor(param):
        return value
    import torch.distributed as dist

    mesh = param.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"all_reduce_sum_like supports a 1-D device mesh (FSDP2), got a {mesh.ndim}-D mesh.")
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return out


def reshard(model: torch.nn.Module) -> torch.nn.Module:
    """Put every FSDP2 module of ``model`` back in its sharded state; returns ``model``.

    FSDP2 does not reshard the root module after a forward pass that has no backward (evaluation):
    until the next backward, ``model.named_parameters()`` then yields the root's *unsharded* plain
    tensors instead of its DTensor parameters. A strategy that binds parameters or snapshots them
    between tasks calls this first, outside forward/backward. A no-op on a model without FSDP2.

    >>> layer = torch.nn.Linear(2, 2)
    >>> reshard(layer) is layer
    True
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return model
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor ``full`` (the same on every rank) as a DTensor sharded like ``param``: each
    rank keeps its own slice, without communication. ``full`` itself when ``param`` is plain.

    For state built whole before FSDP2 sharded the model (or loaded whole from a checkpoint), and
    for a draw of the whole tensor that every rank repeats with the same seed.

    Example:

    >>> import torch
    >>> shard_like(torch.arange(3), torch.zeros(3)).tolist()  # not sharded: unchanged
    [0, 1, 2]
    """
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    if full.shape != param.shape:
        raise ValueError(f"shard_like: the tensor has shape {tuple(full.shape)}, the parameter {tuple(param.shape)}.")
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def shard_plain_modules(model: torch.nn.Module) -> list[str]:
    """Shard, with FSDP2, every module of an FSDP2-sharded ``model`` whose own parameters are still
    plain tensors (modules a strategy added after the model was wrapped: a new LoRA adapter).

    Each such module becomes its own FSDP2 unit on the mesh of the model's other parameters, so
    its parameters are DTensors and its gradients are reduce-scattered like every other one. Call
    it before the task's optimizer is built. Returns the names of the modules sharded (none when
    ``model`` is not sharded).

    Example:

    >>> import torch
    >>> shard_plain_modules(torch.nn.Linear(2, 2))  # not sharded: nothing to do
    []
    """
    reshard(model)  # after an evaluation FSDP2 may hold unsharded plain copies in the parameters' places
    sharded = next((p for p in model.parameters() if is_dtensor(p)), None)
    if sharded is None:
        return []
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, FSDPModule) and not any(is_dtensor(p) for p in own):
            fully_shard(module, mesh=sharded.device_mesh, reshard_after_forward=True)
            names.append(name)
    return names
