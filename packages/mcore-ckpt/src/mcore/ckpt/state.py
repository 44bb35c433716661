"""The training state as global tensors: what a checkpoint holds, whatever the layout.

Keys:

``model.<name>``
    Every parameter and persistent buffer under its state-dict name (pipeline stages keep
    global layer names). Trainable weights are read from the optimizer's fp32 main weights, so
    a bf16 run still checkpoints fp32 weights; a stage's copy of another stage's tensor (the
    tied output embedding) is stored once, under the original's name.
``optimizer.state.<name>.<state>``
    The optimizer's per-parameter state (``exp_avg``, ``exp_avg_sq``: global tensors shaped
    like the parameter; ``step``: a 0-d tensor).
``rng.<generator>``
    Each rank's random generator state, one row per rank (restored only at the same world
    size).

Everything else (iteration, scheduler, loss scale, config, layout) is small and JSON: see
:mod:`mcore.ckpt.checkpointer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.parallel.sharding import (
    ShardedTensor,
    model_sharded_tensors,
    named_layouts,
    unwrap,
)

__all__ = ["model_tensors", "nbytes", "restore_rng", "rng_tensors", "save_tensors", "snapshot"]

MODEL = "model."
OPTIMIZER = "optimizer."


def model_tensors(chunks: Sequence[nn.Module], *, for_save: bool) -> dict[str, ShardedTensor]:
    """``model.<name>`` of this rank's chunks. Saving leaves out stage copies of tensors that
    another stage holds (they are stored once, by that stage)."""
    out = {}
    for key, sharded in model_sharded_tensors(chunks).items():
        full = MODEL + key
        out[full] = dataclasses.replace(sharded, key=full)
    if for_save:
        for key in _aliases(chunks):
            out.pop(MODEL + key, None)
    return out


def _aliases(chunks: Sequence[nn.Module]) -> set[str]:
    """Checkpoint keys this rank holds only as a copy of another stage's tensor."""
    copies = set()
    for chunk in chunks:
        for name, p in unwrap(chunk).named_parameters():
            key = getattr(p, "checkpoint_key", None)
            if key and key != name:
                copies.add(key)
    owners = set()
    for chunk in chunks:
        owners |= {n for n, _ in unwrap(chunk).named_parameters()}
    return copies - owners


def save_tensors(chunks: Sequence[nn.Module], optimizer: Any) -> dict[str, Any]:
    """Everything this rank writes: model weights (from the main weights), optimizer state,
    random generator states."""
    tensors: dict[str, Any] = model_tensors(chunks, for_save=True)
    skip = _aliases(chunks)
    if hasattr(optimizer, "sharded_state_dict"):
        from_optimizer = optimizer.sharded_state_dict(named_layouts(chunks))
        for key, value in from_optimizer.items():
            name = key.removeprefix(MODEL).removeprefix("optimizer.state.")
            if any(name == k or name.startswith(k + ".") for k in skip):
                continue  # a stage copy: its owner writes it
            tensors[key] = value
    tensors.update(rng_tensors())
    return tensors


def rng_tensors() -> dict[str, ShardedTensor]:
    """``rng.cpu`` (and ``rng.cuda``): this rank's generator state as row ``rank`` of a
    ``[world, n]`` tensor."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    out = {}
    for key, state in states.items():
        row = state.clone().view(1, -1)
        out[key] = ShardedTensor(key, (world, row.shape[1]), row.dtype, [(row, (rank, 0))])
    return out


def restore_rng(loaded: dict[str, ShardedTensor]) -> None:
    """Set the generators from :func:`rng_tensors` pieces that were loaded in place."""
    for key, sharded in loaded.items():
        (row, _), *_ = sharded.pieces
        if key == "rng.cpu":
            torch.set_rng_state(row.view(-1).clone())
        elif key == "rng.cuda" and torch.cuda.is_available():
            torch.cuda.set_rng_state(row.view(-1).clone())


def snapshot(tensors: dict[str, Any]) -> dict[str, Any]:
    """CPU copies of every piece, so that training can change the originals while a
    background worker writes the copies (pinned when CUDA is present: faster to fill)."""
    pin = torch.cuda.is_available()

    def copy(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        out.copy_(t.detach(), non_blocking=pin)
        return out

    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if isinstance(value, ShardedTensor):
            pieces = [(copy(data), offset) for data, offset in value.pieces]
            out[key] = dataclasses.replace(value, pieces=pieces)
        else:
            out[key] = copy(value)
    if pin:
        torch.cuda.synchronize()
    return out


def nbytes(tensors: dict[str, Any]) -> int:
    """Bytes this rank writes for ``tensors``."""
    total = 0
    for value in tensors.values():
        if isinstance(value, ShardedTensor):
            total += sum(t.numel() * t.element_size() for t, _ in value.pieces)
        else:
            total += value.numel() * value.element_size()
    return total
