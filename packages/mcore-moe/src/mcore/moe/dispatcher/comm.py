"""Differentiable collectives with uneven sizes, as expert parallelism needs them.

Each is an autograd Function whose backward is the opposite collective. They are written with
``all_to_all_single`` and the ``*_into_tensor`` collectives, which NCCL and gloo both provide, so
the same dispatch runs on GPUs and on a laptop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _empty(rows: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((rows, *like.shape[1:]))


def _all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group
) -> torch.Tensor:
    out = _empty(sum(out_splits), x)
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> torch.Tensor:
    """Send ``x``'s row chunks (``in_splits``, one per rank) to the ranks of ``group``; receive
    ``out_splits`` rows from each."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def _all_gather_v(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    world = len(sizes)
    if len(set(sizes)) == 1:
        out = _empty(sizes[0] * world, x)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out
    # Uneven: every rank sends its whole tensor to every rank.
    rows = x.shape[0]
    return _all_to_all(x.repeat(world, *([1] * (x.dim() - 1))), sizes, [rows] * world, group)


def _reduce_scatter_v(x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    world = len(sizes)
    mine = sizes[rank]
    if len(set(sizes)) == 1:
        out = _empty(mine, x)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    # Uneven: send each rank its chunk from every rank, then sum the received copies.
    received = _all_to_all(x, [mine] * world, sizes, group)
    return received.view(world, mine, *x.shape[1:]).sum(dim=0)


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_v(x, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad):
        return _reduce_scatter_v(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        return _reduce_scatter_v(x, sizes, rank, group)

    @staticmethod
    def backward(ctx: Any, grad):
        return _all_gather_v(grad, ctx.sizes, ctx.group), None, None, None


def all_gather_v(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` (``sizes[r]`` rows on rank ``r``) in rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGatherV.apply(x, list(sizes), dist.get_rank(group), group)


def reduce_scatter_v(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` and keep this rank's ``sizes[rank]`` rows."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _ReduceScatterV.apply(x, list(sizes), dist.get_rank(group), group)


def gather_sizes(count: int | torch.Tensor, group: Any) -> list[int]:
    """Every rank's ``count`` (ints or 1-D tensors of counts) over ``group``, in rank order."""
    t = torch.as_tensor(count, dtype=torch.long).reshape(-1)
    if group is None or dist.get_world_size(group) == 1:
        return t.tolist() if t.numel() > 1 else [int(t)]
    device = _device(group)
    local = t.to(device)
    out = torch.empty(dist.get_world_size(group) * t.numel(), dtype=torch.long, device=device)
    dist.all_gather_into_tensor(out, local, group=group)
    return out.cpu().tolist()


def _device(group: Any) -> torch.device:
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
