"""Where every parameter lives inside one bucket's flat buffers.

A bucket holds parameters of one dtype. Each parameter is sharded along dim 0 the way
``DTensor``'s ``Shard(0)`` splits a tensor: ``c = ceil(rows / N)`` rows per rank, rank ``r``
owning rows ``[r*c, min(rows, (r+1)*c))`` (possibly none). Its chunk is padded to exactly ``c``
rows, so every rank's shard of every parameter has the same size and therefore every rank's
*flat shard* (the concatenation of its chunks) has the same size ``S``. Collectives then run on
the flat buffers as they are, one per bucket:

* the **shard** buffer (``S`` elements) is this rank's chunks, parameter after parameter;
* the **gathered** buffer (``N * S``) is rank-major: rank 0's shard, then rank 1's, ... It is what
  ``all_gather_into_tensor`` writes and what ``reduce_scatter_tensor`` reads;
* the **unsharded** buffer (``N * S``) is parameter-major: parameter ``i`` occupies
  ``N * c_i * row_numel_i`` contiguous elements, of which the first ``numel_i`` are the full
  parameter. Modules compute with views of it.

Going from gathered to unsharded is one ``split_with_sizes_copy`` over the ``(N, S)`` view; going
from a full gradient to the rank-major layout is at most two strided adds per parameter. This
costs one copy per gather, but it is what lets every rank's piece of a parameter be an honest
``Shard(0)`` DTensor that ``torch.distributed.checkpoint`` can reshard to any world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's geometry in a bucket sharded over ``world`` ranks."""

    shape: torch.Size
    rows: int
    """Size of dim 0 (the sharded dim)."""
    row_numel: int
    """Elements per row (product of the other dims)."""
    chunk_rows: int
    """Rows per rank, ``ceil(rows / world)``; the last ranks may own fewer (padding)."""
    offset: int
    """Start of this parameter's chunk inside a rank's flat shard."""

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel

    @property
    def chunk_numel(self) -> int:
        return self.chunk_rows * self.row_numel

    def local_rows(self, rank: int) -> int:
        """How many real (unpadded) rows rank ``rank`` owns."""
        return max(0, min(self.chunk_rows, self.rows - rank * self.chunk_rows))


@dataclass(frozen=True)
class FlatLayout:
    """Geometry of one bucket: its parameters' slots and the flat shard size."""

    slots: tuple[ParamSlot, ...]
    world: int
    shard_numel: int

    @classmethod
    def build(cls, shapes: Sequence[torch.Size], world: int) -> FlatLayout:
        """Lay out ``shapes`` (in order) for sharding over ``world`` ranks."""
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        slots, offset = [], 0
        for shape in shapes:
            if len(shape) == 0:
                raise ValueError(
                    "megatron_fsdp shards parameters along dim 0 and cannot shard a 0-d "
                    "parameter; store it with shape (1,) instead"
                )
            rows = shape[0]
            row_numel = math.prod(shape[1:])
            chunk_rows = math.ceil(rows / world)
            slots.append(ParamSlot(torch.Size(shape), rows, row_numel, chunk_rows, offset))
            offset += chunk_rows * row_numel
        return cls(tuple(slots), world, offset)

    @property
    def unsharded_numel(self) -> int:
        return self.world * self.shard_numel

    def local_view(self, shard: torch.Tensor, index: int, rank: int) -> torch.Tensor:
        """This rank's (unpadded) chunk of parameter ``index``, a view into ``shard``."""
        slot = self.slots[index]
        rows = slot.local_rows(rank)
        start = slot.offset
        return shard[start : start + rows * slot.row_numel].view(rows, *slot.shape[1:])

    def unsharded_view(self, unsharded: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index`` at full shape, a view into the parameter-major ``unsharded``."""
        slot = self.slots[index]
        start = self.world * slot.offset
        return unsharded[start : start + slot.numel].view(slot.shape)

    def copy_shard_from_full(self, shard: torch.Tensor, index: int, full: torch.Tensor, rank: int):
        """Fill this rank's chunk of parameter ``index`` from the full tensor (at init/load)."""
        slot = self.slots[index]
        rows = slot.local_rows(rank)
        if rows:
            first = rank * slot.chunk_rows
            src = full.detach().reshape(slot.rows, slot.row_numel)[first : first + rows]
            self.local_view(shard, index, rank).view(rows, slot.row_numel).copy_(src)

    def copy_out(self, gathered: torch.Tensor, unsharded: torch.Tensor) -> None:
        """Rearrange a rank-major gathered buffer into the parameter-major unsharded buffer."""
        world = self.world
        outs = [
            unsharded[world * s.offset : world * (s.offset + s.chunk_numel)].view(
                world, s.chunk_numel
            )
            for s in self.slots
        ]
        sizes = [s.chunk_numel for s in self.slots]
        torch.split_with_sizes_copy(gathered.view(world, self.shard_numel), sizes, dim=1, out=outs)

    def add_full_grad(
        self, gathered: torch.Tensor, index: int, grad: torch.Tensor, alpha: float
    ) -> None:
        """``gathered += alpha * grad`` for parameter ``index``, into the rank-major layout.

        Padding rows are never written, so they stay zero and reduce to zero.
        """
        slot = self.slots[index]
        world, c, rn = self.world, slot.chunk_rows, slot.row_numel
        if slot.numel == 0:
            return
        region = gathered.view(world, self.shard_numel)[:, slot.offset : slot.offset + c * rn]
        flat = grad.reshape(slot.rows, rn)
        full_ranks = slot.rows // c  # ranks whose chunk has no padding
        if full_ranks:
            dst = region[:full_ranks].view(full_ranks, c, rn)
            dst.add_(flat[: full_ranks * c].view(full_ranks, c, rn), alpha=alpha)
        rest = slot.rows - full_ranks * c
        if rest:
            region[full_ranks, : rest * rn].add_(flat[full_ranks * c :].reshape(-1), alpha=alpha)
