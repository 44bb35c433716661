"""Flat gradient buffers split into buckets: the memory layout that data parallelism reduces.

Every trainable parameter's gradient lives in one flat tensor per (dtype, device), and
``param.main_grad`` is a view into it. Parameters are laid out in *reverse* registration order,
the order backward produces their gradients, so the first bucket fills first and its reduction
can start while backward is still computing the rest. A parameter never straddles two buckets.

For the distributed optimizer each bucket is padded so that it splits into equal, aligned,
contiguous shards, one per data-parallel rank: rank ``r``'s shard of every bucket is what its
reduce-scatter delivers and what its optimizer updates. Parameters then also live in a flat
tensor of the same layout (``param.data`` becomes a view into it), so that the updated shards
can be all-gathered straight into the parameters, with no copy.

A parameter marked ``shared_embedding`` (one pipeline stage's copy of tied word embeddings, see
:mod:`mcore.parallel.pipeline`) gets a bucket of its own, as in Megatron-Core: both copies then
split into the same shards, so summing their gradients across stages stays element-wise valid
even after a reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SHARD_ALIGNMENT = 64
"""Elements that each distributed-optimizer shard is a multiple of, so every shard starts on an
aligned address (vectorised kernels and NCCL's fast paths want this)."""


@dataclass(eq=False)
class Bucket:
    """Consecutive parameters of one buffer whose gradients one collective reduces."""

    index: int
    """Position in the launch order: the order in which backward is expected to complete buckets."""
    buffer: GradBuffer
    params: list[nn.Parameter]
    """In buffer order (reverse registration order)."""
    start: int
    """Offset of the bucket in its buffer."""
    end: int
    """End offset in its buffer (exclusive), padding included."""
    group: Any = None
    """The data-parallel group that reduces this bucket (``dp_cp``, or ``edp`` for experts)."""
    group_size: int = 1
    group_rank: int = 0

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def grad_data(self) -> torch.Tensor:
        """The bucket's gradients (a view of the buffer)."""
        return self.buffer.grad_data[self.start : self.end]

    @property
    def param_data(self) -> torch.Tensor:
        """The bucket's parameters (a view); only with ``contiguous_params``."""
        if self.buffer.param_data is None:
            raise RuntimeError("this buffer was built without contiguous_params")
        return self.buffer.param_data[self.start : self.end]

    def shard_range(self, rank: int, count: int) -> tuple[int, int]:
        """Buffer offsets ``[start, end)`` of shard ``rank`` out of ``count`` equal shards."""
        if self.numel % count:
            raise RuntimeError(
                f"bucket {self.index} has {self.numel} elements, not divisible into {count} "
                "shards: build the buffers with shard_count equal to the data-parallel size"
            )
        size = self.numel // count
        return self.start + rank * size, self.start + (rank + 1) * size

    def shard(self, data: torch.Tensor, rank: int, count: int) -> torch.Tensor:
        """Shard ``rank`` of ``data``, this bucket's ``grad_data`` or ``param_data``."""
        start, end = self.shard_range(rank, count)
        return data[start - self.start : end - self.start]


class GradBuffer:
    """One flat gradient tensor (and optionally one flat parameter tensor) for the parameters of
    one dtype and device. Build with :func:`build_grad_buffers`."""

    def __init__(self, param_dtype: torch.dtype, grad_dtype: torch.dtype, device: torch.device):
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.device = device
        self.params: list[nn.Parameter] = []
        """In buffer order."""
        self.buckets: list[Bucket] = []
        self.numel = 0
        self.grad_data = torch.empty(0)
        self.param_data: torch.Tensor | None = None
        self._ranges: dict[int, tuple[int, int]] = {}

    def range_of(self, param: nn.Parameter) -> tuple[int, int]:
        """Buffer offsets ``[start, end)`` of ``param``."""
        return self._ranges[id(param)]

    def _place(self, params: list[nn.Parameter], index: int, pad_multiple: int) -> Bucket:
        start = offset = self.numel
        for p in params:
            self._ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
        end = -(-offset // pad_multiple) * pad_multiple
        bucket = Bucket(index=index, buffer=self, params=params, start=start, end=end)
        self.params.extend(params)
        self.buckets.append(bucket)
        self.numel = end
        return bucket

    def _allocate(self, contiguous_params: bool) -> None:
        self.grad_data = torch.zeros(self.numel, dtype=self.grad_dtype, device=self.device)
        if contiguous_params:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=self.device)
        for p in self.params:
            start, end = self._ranges[id(p)]
            if self.param_data is not None:
                flat = self.param_data[start:end].view_as(p)
                flat.copy_(p.data)
                p.data = flat
            p.main_grad = self.grad_data[start:end].view_as(p)  # pyright: ignore[reportAttributeAccessIssue]


def build_grad_buffers(
    params: Sequence[nn.Parameter],
    *,
    bucket_bytes: int | None,
    grad_reduce_in_fp32: bool = False,
    shard_count: int = 1,
    contiguous_params: bool = False,
) -> tuple[list[GradBuffer], list[Bucket]]:
    """Lay out ``params`` (in registration order) in flat buffers and split them into buckets.

    Sets ``param.main_grad`` (zeros, a view into a buffer) on every parameter and, with
    ``contiguous_params``, moves ``param.data`` into the buffer's parameter tensor. Returns the
    buffers and every bucket in launch order. ``bucket_bytes=None`` makes one bucket per buffer;
    ``shard_count > 1`` pads each bucket into that many equal aligned shards.
    """
    pad_multiple = shard_count * SHARD_ALIGNMENT if shard_count > 1 else 1
    buffers: dict[tuple[torch.dtype, torch.device], GradBuffer] = {}
    open_buckets: dict[GradBuffer, tuple[list[nn.Parameter], int]] = {}
    closed: list[tuple[int, GradBuffer, list[nn.Parameter]]] = []  # (last position, ...)
    last_position: dict[GradBuffer, int] = {}
    for position, p in enumerate(reversed(list(params))):
        if not p.is_contiguous():
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is not contiguous; data parallelism "
                "keeps gradients in flat buffers and needs contiguous parameters"
            )
        key = (p.dtype, p.device)
        if key not in buffers:
            grad_dtype = torch.float32 if grad_reduce_in_fp32 else p.dtype
            buffers[key] = GradBuffer(p.dtype, grad_dtype, p.device)
        buf = buffers[key]
        if getattr(p, "shared_embedding", False):
            # A tied embedding copy gets a bucket of its own, so that its shards line up on the
            # first and last pipeline stage, whose gradients are summed element by element.
            if buf in open_buckets:
                closed.append((last_position[buf], buf, open_buckets.pop(buf)[0]))
            closed.append((position, buf, [p]))
            last_position[buf] = position
            continue
        members, numel = open_buckets.get(buf, ([], 0))
        members.append(p)
        numel += p.numel()
        last_position[buf] = position
        limit = None if bucket_bytes is None else max(1, bucket_bytes // buf.grad_dtype.itemsize)
        if limit is not None and numel >= limit:
            closed.append((position, buf, members))
            open_buckets.pop(buf, None)
        else:
            open_buckets[buf] = (members, numel)
    closed.extend((last_position[buf], buf, members) for buf, (members, _) in open_buckets.items())
    # Launch order = the order backward completes buckets: by the position of each one's last
    # parameter. Within one buffer this is also placement order, so buffers stay contiguous.
    closed.sort(key=lambda item: item[0])
    buckets = [buf._place(members, i, pad_multiple) for i, (_, buf, members) in enumerate(closed)]
    for buf in buffers.values():
        buf._allocate(contiguous_params)
    return list(buffers.values()), buckets
