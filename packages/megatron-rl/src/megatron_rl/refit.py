"""Refit: the training model's weights, from any parallel layout, into an inference engine.

Training holds each tensor as pieces of the global tensor (TP shards, pipeline stages' layers,
expert shards, FSDP chunks; :func:`mcore.parallel.sharding.model_sharded_tensors` says which
piece sits where). The engine holds the whole single-process model. :func:`full_weights`
rebuilds every global tensor on every rank:

1. every rank describes its pieces (key, global offset, size); one ``all_gather_object``;
2. each distinct piece gets one owner, the lowest rank holding it (replicas of a piece, e.g.
   data-parallel copies, are written once); the owned pieces must tile each tensor exactly;
3. tensors are grouped in buckets of one dtype (about ``bucket_mb``); per bucket every rank
   writes the pieces it owns into a zeroed flat buffer and one ``all_reduce`` (sum) completes
   it everywhere.

:func:`refit_engine` copies each bucket into the engine as it arrives
(``engine.update_weights(bucket, strict=False)``), so no second full copy of the model is held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mcore.core import McoreError
from mcore.parallel.sharding import model_sharded_tensors

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global offset, size)


@dataclass
class _Plan:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owners: dict[Box, int]


def _narrow(tensor: torch.Tensor, offset: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offset, size, strict=True)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def _plans(local: dict[str, tuple], world: int, gathered: list[dict[str, tuple]]) -> list[_Plan]:
    plans: dict[str, _Plan] = {}
    for rank in range(world):
        for key, (shape, dtype, boxes) in gathered[rank].items():
            plan = plans.setdefault(key, _Plan(key, tuple(shape), dtype, {}))
            if tuple(shape) != plan.shape:
                raise McoreError(
                    f"refit: ranks disagree on the global shape of {key!r}: {plan.shape} and "
                    f"{tuple(shape)}"
                )
            for box in boxes:
                plan.owners.setdefault(box, rank)
    for plan in plans.values():
        covered = sum(math.prod(size) for _, size in plan.owners)
        if covered != math.prod(plan.shape):
            raise McoreError(
                f"refit: the pieces of {plan.key!r} held over the ranks cover {covered} of its "
                f"{math.prod(plan.shape)} elements; the training layout's shards must tile "
                "each tensor (a module's shard_layout is wrong, or pieces overlap)"
            )
    return sorted(plans.values(), key=lambda p: (str(p.dtype), p.key))


def full_weights(
    chunks: Sequence[nn.Module], *, bucket_mb: float = 256.0
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the full model state dict bucket by bucket, the same on every rank (a
    collective: every rank of the world calls it and consumes every bucket)."""
    sharded = model_sharded_tensors(chunks)
    local: dict[str, tuple] = {}
    views: dict[tuple[str, Box], torch.Tensor] = {}
    device = torch.device("cpu")
    for key, st in sharded.items():
        boxes = []
        for view, offset in st.pieces:
            box = (tuple(offset), tuple(view.shape))
            boxes.append(box)
            views[(key, box)] = view
            device = view.device
        local[key] = (st.global_shape, st.dtype, boxes)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    gathered = [local]
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    if distributed and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    limit = max(1, int(bucket_mb * 2**20))
    bucket: list[_Plan] = []

    def flush(bucket: list[_Plan]) -> dict[str, torch.Tensor]:
        dtype = bucket[0].dtype
        sizes = [math.prod(p.shape) for p in bucket]
        flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        out, start = {}, 0
        for plan, n in zip(bucket, sizes, strict=True):
            full = flat[start : start + n].view(plan.shape)
            for box, owner in plan.owners.items():
                if owner == rank:
                    _narrow(full, *box).copy_(views[(plan.key, box)])
            out[plan.key] = full
            start += n
        if distributed:
            dist.all_reduce(flat)
        return out

    for plan in _plans(local, world, gathered):
        size = math.prod(plan.shape) * plan.dtype.itemsize
        if bucket and (plan.dtype != bucket[0].dtype or _bytes(bucket) + size > limit):
            yield flush(bucket)
            bucket = []
        bucket.append(plan)
    if bucket:
        yield flush(bucket)


def _bytes(plans: list[_Plan]) -> int:
    return sum(math.prod(p.shape) * p.dtype.itemsize for p in plans)


def gather_full_state_dict(chunks: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """The whole single-process state dict of the training model, on every rank."""
    out: dict[str, torch.Tensor] = {}
    for bucket in full_weights(chunks):
        out.update(bucket)
    return out


@torch.no_grad()
def refit_engine(engine: object, chunks: Sequence[nn.Module], *, bucket_mb: float = 256.0) -> int:
    """Copy the training weights into ``engine`` (an mcore-inference engine, or anything with
    ``update_weights(state_dict, strict=False)`` and a ``model``); returns the number of
    tensors copied. Every tensor of the engine's model must arrive."""
    received: set[str] = set()
    for bucket in full_weights(chunks, bucket_mb=bucket_mb):
        engine.update_weights(bucket, strict=False)
        received.update(bucket)
    expected = {k for k in engine.model.state_dict() if not k.endswith("inv_freq")}
    missing = sorted(expected - received)
    if missing:
        raise McoreError(
            f"refit: the training model has no tensors for the engine's {missing[:5]}; the "
            "engine must be built from the same model config as training"
        )
    return len(received)
