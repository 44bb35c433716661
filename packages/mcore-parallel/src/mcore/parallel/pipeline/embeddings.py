"""Tied word embeddings across pipeline stages.

With tied input and output embeddings and more than one stage, the first stage looks tokens up
in the embedding table and the last stage projects onto the vocabulary with the same matrix.
Each holds its own copy (built equal, e.g. from the same seed) and marks it with
:func:`mark_shared_embedding`. After backward each copy has only its own stage's part of the
gradient; :func:`allreduce_embedding_grads` sums the two, so both copies take the same optimizer
step and stay equal — the gradient a single tied tensor would have received.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import cast

import torch
import torch.distributed as dist

from mcore.parallel.sharding import is_dtensor
from mcore.parallel.state import ParallelState

# One group per layout; building it is a collective, so it is built once and kept.
_EMBEDDING_GROUPS: weakref.WeakKeyDictionary[ParallelState, dist.ProcessGroup] = (
    weakref.WeakKeyDictionary()
)


def mark_shared_embedding(*params: torch.nn.Parameter) -> None:
    """Mark parameters that are one stage's copy of the tied word embeddings."""
    for p in params:
        p.shared_embedding = True  # pyright: ignore[reportAttributeAccessIssue]


def embedding_group(parallel_state: ParallelState) -> dist.ProcessGroup | None:
    """The group of this rank's first and last pipeline stage (same dp, cp and tp coordinate).

    ``None`` without pipeline parallelism. With two stages it is the pipeline group itself;
    with more it is built on the first call, which is collective: every rank must call it.
    """
    ps = parallel_state
    if ps.pp_size == 1:
        return None
    if ps.pp_size == 2:
        return ps.pp_group
    if ps not in _EMBEDDING_GROUPS:
        assert ps.mesh is not None  # pp_size > 2: a distributed layout
        ranks = ps.mesh.mesh.reshape(ps.pp_size, -1)  # [pp, dp * cp * tp] global ranks
        pairs = [[int(first), int(last)] for first, last in zip(ranks[0], ranks[-1], strict=True)]
        group, _ = dist.new_subgroups_by_enumeration(pairs, group_desc="embedding")
        _EMBEDDING_GROUPS[ps] = cast("dist.ProcessGroup", group)  # every rank is in one pair
    return _EMBEDDING_GROUPS[ps]


def allreduce_embedding_grads(
    model: torch.nn.Module | Iterable[torch.nn.Module], parallel_state: ParallelState
) -> None:
    """Sum the gradients of the tied word-embedding copies between first and last stage.

    The training loop calls this on every rank after the forward-backward schedule and after
    the data-parallel reduction has finished (``finish_grad_sync()`` of each wrapped chunk),
    before the optimizer step; both reductions are sums, and reducing a buffer that an
    overlapped data-parallel collective may still be writing would race. ``model`` is this
    rank's model chunks. A parameter's ``main_grad`` (a data-parallel wrapper's gradient
    buffer) is reduced when it has one, else its ``.grad``. With a distributed optimizer that
    keeps only a shard of each reduced bucket, the marked parameter must sit alone in its
    bucket (as Megatron-Core arranges for ``shared_embedding``) so that both stages shard it
    alike.
    """
    group = embedding_group(parallel_state)
    if group is None or not (parallel_state.is_first_pp_stage or parallel_state.is_last_pp_stage):
        return
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    params = [
        p for chunk in chunks for p in chunk.parameters() if getattr(p, "shared_embedding", False)
    ]
    grads = []
    for p in params:
        grad = getattr(p, "main_grad", None)
        if grad is None:
            if p.grad is None:  # this stage's copy got no gradient; the peer's still counts
                p.grad = torch.zeros_like(p)
            grad = p.grad
        # A fully sharded copy (DTensor): both stages shard the table alike, so the local
        # pieces line up and summing them sums the gradients.
        grads.append(grad.to_local() if is_dtensor(grad) else grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
