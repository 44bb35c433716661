"""Differentiable collectives that move activations in and out of tensor-parallel regions.

Each mapping is a pair: what the forward does and the collective its gradient needs, which is
the forward's adjoint (all-reduce ↔ identity, all-gather ↔ reduce-scatter or split). Layers
call them in their ``forward`` so the communication is visible where it happens.

Tensors inside a model are sequence-first ``[s, b, h]``: the tensor-parallel mappings work on
the last (hidden) dimension and the sequence-parallel ones on dimension 0. Every mapping is the
identity, with no autograd node, when ``group`` is ``None`` or has one rank.

The collectives are ``all_reduce``, ``all_gather_into_tensor`` and ``reduce_scatter_tensor``,
which NCCL runs natively and gloo (CPU) supports as well; gloo implements reduce-scatter as an
all-reduce followed by a local slice, which is correct but moves twice the data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mcore.parallel.errors import ParallelLayoutError
from mcore.parallel.tensor_parallel.utils import group_rank, group_size

ProcessGroup = dist.ProcessGroup

# ---------------------------------------------------------------------------------------------
# Plain collectives on one group (size > 1). They return new tensors and never write into their
# input: the input may be saved for backward or still be used by the caller.


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim``."""
    size = group_size(group)
    length = x.shape[dim]
    if length % size != 0:
        raise ParallelLayoutError(
            f"cannot split dimension {dim} of a tensor of shape {tuple(x.shape)} over "
            f"{size} tensor-parallel ranks: {length} is not divisible by {size}"
        )
    chunk = length // size
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _all_gather_first_dim(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dimension 0, in rank order."""
    x = x.contiguous()
    out = x.new_empty((group_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _all_gather_last_dim(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in rank order."""
    # The flat collective stacks ranks outermost; move that axis next to the last one.
    stacked = _all_gather_first_dim(x.unsqueeze(0), group)  # [tp, ..., h]
    return stacked.movedim(0, -2).flatten(-2)  # [..., tp * h]


def _reduce_scatter_first_dim(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk of dimension 0."""
    size = group_size(group)
    if x.shape[0] % size != 0:
        raise ParallelLayoutError(
            f"cannot reduce-scatter a tensor of shape {tuple(x.shape)} over {size} "
            f"tensor-parallel ranks: dimension 0 ({x.shape[0]}) is not divisible by {size}"
        )
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


def _is_trivial(group: ProcessGroup | None) -> bool:
    return group is None or dist.get_world_size(group) == 1


# ---------------------------------------------------------------------------------------------
# Autograd functions: forward collective, backward adjoint.


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_last_dim(grad, ctx.group), None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, -1, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_first_dim(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: ProcessGroup, tensor_parallel_output_grad: bool
    ) -> torch.Tensor:
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather_first_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first_dim(grad, ctx.group), None, None
        return _split(grad, 0, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_first_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_first_dim(grad, ctx.group), None


# ---------------------------------------------------------------------------------------------
# Public mappings.


def copy_to_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region with a replicated input: forward identity, backward all-reduce.

    Each rank's branch contributes part of the input's gradient, so the parts are summed.
    """
    if _is_trivial(group):
        return x
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region by summing partial results: forward all-reduce, backward identity."""
    if _is_trivial(group):
        return x
    return _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension; backward all-gathers the gradient."""
    if _is_trivial(group):
        return x
    return _ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather the last dimension in rank order; backward keeps this rank's chunk."""
    if _is_trivial(group):
        return x
    return _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: ProcessGroup | None
) -> torch.Tensor:
    """Keep this rank's chunk of the sequence (dim 0); backward all-gathers the gradient.

    Use on a tensor every TP rank holds in full, e.g. position embeddings, to enter the
    sequence-parallel layout ``[s / tp, b, h]``.
    """
    if _is_trivial(group):
        return x
    return _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor,
    group: ProcessGroup | None,
    *,
    tensor_parallel_output_grad: bool = True,
) -> torch.Tensor:
    """All-gather the sequence (dim 0): ``[s / tp, b, h]`` → ``[s, b, h]``.

    Backward reduce-scatters: the gathered tensor usually feeds a TP-split computation (a
    column-parallel linear), so each rank holds only its part of the full gradient. Pass
    ``tensor_parallel_output_grad=False`` when the consumer is replicated (every rank computes
    the same full gradient); then backward just keeps this rank's chunk.
    """
    if _is_trivial(group):
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: ProcessGroup | None
) -> torch.Tensor:
    """Sum partial results and keep this rank's chunk of the sequence (dim 0):
    ``[s, b, h]`` partial → ``[s / tp, b, h]`` reduced. Backward all-gathers the gradient."""
    if _is_trivial(group):
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
