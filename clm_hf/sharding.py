"""Small helpers for strategies whose parameters and gradients may be FSDP2 shards (DTensors).

Under FSDP2 every parameter of the model is a ``torch.distributed.tensor.DTensor`` sharded over a
device mesh, and so is its gradient after backward. A strategy keeps its own state where the
parameters live (in the local shard) and reduces only small things (dot products, counts) over the
ranks that hold the other shards. Outside FSDP these helpers are no-ops on plain tensors, so the
single-process and DDP code paths stay exactly as they were.
"""

from __future__ import annotations

import torch


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 shard), without importing DTensor eagerly.

    Example:

    >>> import torch
    >>> is_dtensor(torch.zeros(2))
    False
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage, so writes land in it), else ``tensor``.

    Example:

    >>> import torch
    >>> t = torch.ones(3)
    >>> local_part(t) is t
    True
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like_sharded(local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard) as a tensor placed like ``reference``: a DTensor on the same mesh
    with the same placements, global shape and stride when ``reference`` is one, else ``local``.

    Example:

    >>> import torch
    >>> like_sharded(torch.zeros(2), torch.ones(2)).tolist()
    [0.0, 0.0]
    """
    if not is_dtensor(reference):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())


def all_reduce_sum_over_shards_(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum, in place, a plain tensor of per-rank partial results over the ranks that hold the other
    shards of ``like`` (the mesh dimensions on which ``like`` is sharded; replicated dimensions
    already hold the whole value). A no-op when ``like`` is not a DTensor or not sharded.

    Every rank must call it in the same order (it is a collective). The result is the same, to the
    bit, on every rank.

    Args:
        tensor (`torch.Tensor`): Local partial sums (a dot product, a Gram matrix, a count).
        like (`torch.Tensor`): A parameter (or its gradient) whose sharding defines the ranks.

    Returns:
        `torch.Tensor`: ``tensor``, now holding the sum.

    Example:

    >>> import torch
    >>> all_reduce_sum_over_shards_(torch.tensor([1.0]), torch.zeros(2)).tolist()  # not sharded: unchanged
    [1.0]
    """
    if not is_dtensor(like):
        return tensor
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = like.device_mesh
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard) and mesh.size(dim) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return tensor
