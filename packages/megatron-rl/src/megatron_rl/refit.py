"""Refit: the training model's weights, from any parallel layout, into an inference engine.

Two ways, by where the engine's model lives (:func:`megatron_rl.inference.engine_layout`):

- **Shards** (the engine in the training layout): the engine's tensors correspond one to one,
  by state-dict name and shape, with this rank's tensors of the training model (TP and expert
  shards, a pipeline stage's layers under their global numbers, the last stage's own copy of
  tied word embeddings), so each rank copies its own (:func:`local_weights`); a name or shape
  without its counterpart is refused before anything is copied. A fully sharded parameter
  (megatron-fsdp's ``DTensor``) is gathered over its data-parallel mesh only, a bucket at a
  time; no rank ever holds a whole tensor of a TP-sharded parameter.
- **Whole** (each rank's engine holds the single-process model): training holds each tensor as
  pieces of the global tensor (TP shards, pipeline stages' layers, expert shards, FSDP chunks;
  :func:`mcore.parallel.sharding.model_sharded_tensors` says which piece sits where), and
  :func:`full_weights` rebuilds every global tensor on every rank:

  1. every rank describes its pieces (key, global offset, size); one ``all_gather_object``;
  2. each distinct piece gets one owner, the lowest rank holding it (replicas of a piece, e.g.
     data-parallel copies, are written once); the owned pieces must tile each tensor exactly;
  3. tensors are grouped in buckets of one dtype (about ``bucket_mb``); per bucket every rank
     writes the pieces it owns into a zeroed flat buffer and one ``all_reduce`` (sum) completes
     it everywhere.

:func:`refit_engine` copies each bucket into the engine as it arrives
(``engine.update_weights(bucket, strict=False)``), so no second full copy of the model is held
besides the engine's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from mcore.core import McoreError
from mcore.parallel.sharding import is_dtensor, model_sharded_tensors, unwrap

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from mcore.inference.protocols import InferenceEngine

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
    gathered: list[Any] = [local]
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


def local_weights(
    chunk: nn.Module, *, bucket_mb: float = 256.0
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's tensors of one training model chunk by state-dict name, as its modules hold
    them (TP and expert shards), in buckets.

    A fully sharded tensor (a ``DTensor``) is gathered over its own data-parallel mesh, never
    over TP (a collective of that mesh: its ranks consume the buckets together). The gathered
    tensors of one bucket (about ``bucket_mb``, or one tensor) are all this allocates; every
    other entry is a view of the training model's storage.
    """
    limit = max(1, int(bucket_mb * 2**20))
    bucket: dict[str, torch.Tensor] = {}
    held = 0
    for name, tensor in unwrap(chunk).state_dict(keep_vars=True).items():
        if tensor is None:
            continue
        if is_dtensor(tensor):
            size = tensor.numel() * tensor.dtype.itemsize
            if bucket and held + size > limit:
                yield bucket
                bucket, held = {}, 0
            tensor = cast("DTensor", tensor.detach()).full_tensor()
            held += size
        bucket[name] = tensor.detach()
    if bucket:
        yield bucket


@torch.no_grad()
def copy_local_weights(target: nn.Module, chunk: nn.Module, *, bucket_mb: float = 256.0) -> int:
    """Copy this rank's tensors of training chunk ``chunk`` into ``target``, a model built in
    the same layout (:func:`local_weights`); returns the number of tensors copied."""
    check_counterparts(target, chunk)
    own = target.state_dict()
    copied = 0
    for bucket in local_weights(chunk, bucket_mb=bucket_mb):
        for name, value in bucket.items():
            if name not in own or own[name].shape != value.shape:
                have = tuple(own[name].shape) if name in own else "no such tensor"
                raise McoreError(
                    f"refit: training's {name!r} {tuple(value.shape)} has no counterpart in the "
                    f"copy ({have}); it must be built from the same model config and layout"
                )
            own[name].copy_(value)
            copied += 1
    return copied


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict tensors of ``module`` by name: their (global, for a ``DTensor``) shapes;
    rotary frequencies, derived on every rank, left out."""
    return {
        name: tuple(t.shape)
        for name, t in unwrap(module).state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor) and not name.endswith("inv_freq")
    }


def check_counterparts(target: nn.Module, chunk: nn.Module) -> None:
    """Refuse, by name, unless ``target``'s tensors and this rank's tensors of the training
    ``chunk`` match one to one in name and shape (what :func:`local_weights` copies)."""
    mine, theirs = _shapes(target), _shapes(chunk)
    problems = []
    only_training = sorted(set(theirs) - set(mine))
    if only_training:
        problems.append(f"training's {only_training[:5]} are not in the engine")
    only_engine = sorted(set(mine) - set(theirs))
    if only_engine:
        problems.append(f"the engine's {only_engine[:5]} are not in training")
    shapes = [
        f"{k} {theirs[k]} vs {mine[k]}" for k in sorted(set(mine) & set(theirs))
        if mine[k] != theirs[k]
    ]  # fmt: skip
    if shapes:
        problems.append(f"shapes differ (training vs engine): {shapes[:5]}")
    if problems:
        stage = getattr(getattr(unwrap(chunk), "parallel_state", None), "pp_rank", 0)
        raise McoreError(
            f"refit: this rank's training tensors (pipeline stage {stage}) and the engine's do "
            f"not match one to one: {'; '.join(problems)}. Build the engine from the same "
            "model config in the same parallel layout (engine_layout), or refit the whole "
            "model (sharded=False)"
        )


@torch.no_grad()
def refit_engine(
    engine: InferenceEngine,
    chunks: Sequence[nn.Module],
    *,
    sharded: bool = False,
    bucket_mb: float = 256.0,
) -> int:
    """Copy the training weights into ``engine`` (an mcore-inference engine, or anything with
    ``update_weights(state_dict, strict=False)`` and a ``model``); returns the number of
    tensors copied. Every tensor of the engine's model must arrive.

    ``sharded``: the engine's model is this rank's part of the training layout (see
    :func:`megatron_rl.inference.engine_layout`), so each rank copies its own shards (it
    communicates only to gather fully sharded parameters over their data-parallel ranks);
    else the engine holds the whole model and every tensor is assembled on every rank (a
    collective of the world).
    """
    own = set(engine.model.state_dict())
    expected = {k for k in own if not k.endswith("inv_freq")}
    if sharded:
        if len(chunks) != 1:
            raise McoreError(
                f"refit: an engine in the training layout holds one model chunk, training has "
                f"{len(chunks)} (virtual pipeline stages): refit it with sharded=False"
            )
        check_counterparts(engine.model, chunks[0])
        buckets = local_weights(chunks[0], bucket_mb=bucket_mb)
    else:
        buckets = full_weights(chunks, bucket_mb=bucket_mb)
    received: set[str] = set()
    for bucket in buckets:
        unknown = sorted(set(bucket) - own)
        if unknown:
            raise McoreError(
                f"refit: the engine's model has no tensors named {unknown[:5]}; it must be "
                "built from the same model config (and, sharded, the same layout) as training"
            )
        engine.update_weights(bucket, strict=False)
        received.update(bucket)
    missing = sorted(expected - received)
    if missing:
        raise McoreError(
            f"refit: the training model has no tensors for the engine's {missing[:5]}; the "
            "engine must be built from the same model config as training"
        )
    return len(received)
