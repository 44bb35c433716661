"""Context parallelism (CP): the sequence dimension sharded over a process group.

Load-balanced layout. With a causal mask the query at position ``p`` attends to ``p + 1`` keys, so
a contiguous split would give the last CP rank about ``2 * cp - 1`` times the work of the first.
Instead the sequence is cut into ``2 * cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, one early and one late, in that order. Every rank then has the same number of
(query, key) pairs. Megatron-Core and Transformer Engine use the same layout, so shards made here
feed TE's context-parallel attention unchanged.

Gradient convention. ``split_for_context_parallel`` and ``gather_from_context_parallel`` open and
close a CP region. A tensor outside it is replicated: every rank holds the same full tensor. A
tensor inside it is sharded, and each rank holds the complete gradient of its own shard. Weights
are replicated, so each CP rank accumulates its tokens' share of their gradient; the
data-parallel reduction over the dp x cp group sums the shares, as in Megatron-Core. Hence:

- ``split``'s backward puts the shard's gradient back at the shard's positions and leaves zeros
  elsewhere. It runs no collective, and the shares sum over the group to the full gradient.
- ``gather``'s backward hands each rank its own shard of the incoming gradient. That is right when
  what follows the gather runs identically on every rank (a loss every rank computes), so the
  gradient is the same everywhere and is counted once. Weights used after a gather would get
  that full gradient on every rank and be counted cp times by the reduction above.
- Inside attention, every rank's queries read every rank's keys. So the all-gather of K and V
  reduce-scatters in its backward: each key's gradient sums the contributions of all ranks'
  queries and lands on the rank that owns the key.

All functions take the CP group explicitly. A ``None`` group, or a group of size 1, means no
context parallelism: each function then leaves its input unchanged (attention is plain causal
SDPA).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore.parallel.errors import ParallelLayoutError, ShardShapeError

__all__ = [
    "context_parallel_attention",
    "cp_local_positions",
    "gather_from_context_parallel",
    "split_for_context_parallel",
]


def _cp_size_and_rank(cp_group: Any) -> tuple[int, int]:
    if cp_group is None:
        return 1, 0
    return dist.get_world_size(cp_group), dist.get_rank(cp_group)


def _check_divisible(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size):
        raise ParallelLayoutError(
            f"sequence length {seq_len} is not divisible by 2 * context-parallel size "
            f"(2 * {cp_size} = {2 * cp_size}): the load-balanced layout cuts the sequence into "
            f"{2 * cp_size} equal chunks; pad the sequence to a multiple of {2 * cp_size}"
        )


def cp_local_positions(
    seq_len: int, cp_size: int, cp_rank: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return the global positions of the tokens on ``cp_rank``, in local order (int64).

    Anything that depends on position (rotary embeddings, masks, position ids) must use these
    positions on a CP shard, not ``arange(s_local)``. ``seq_len`` is the full sequence length.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ParallelLayoutError(
            f"cp_rank must be in [0, cp_size) with cp_size >= 1, got cp_rank={cp_rank}, "
            f"cp_size={cp_size}"
        )
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    _check_divisible(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat(
        [
            torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device),
            torch.arange(late * chunk, (late + 1) * chunk, device=device),
        ]
    )


def _chunk_slots(cp_size: int) -> list[tuple[int, int, int]]:
    """``(rank, slot, global chunk)`` for every chunk; slot 0 is a rank's early chunk, 1 its
    late one."""
    return [(r, s, r if s == 0 else 2 * cp_size - 1 - r) for r in range(cp_size) for s in (0, 1)]


def _take_local(full: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    chunk = full.shape[dim] // (2 * cp_size)
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat(
        [full.narrow(dim, cp_rank * chunk, chunk), full.narrow(dim, late * chunk, chunk)], dim
    )


def _all_gather_in_global_order(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """All-gather the local shards ``x`` and put their chunks in global sequence order."""
    cp_size = dist.get_world_size(group)
    x = x.contiguous()
    shards = x.new_empty((cp_size, *x.shape))
    # Flat views: gloo accepts only the concatenated (not the stacked) output layout.
    dist.all_gather_into_tensor(shards.view(-1), x.view(-1), group=group)
    chunk = x.shape[dim] // 2
    shape = list(x.shape)
    shape[dim] *= cp_size
    full = x.new_empty(shape)
    for rank, slot, c in _chunk_slots(cp_size):
        full.narrow(dim, c * chunk, chunk).copy_(shards[rank].narrow(dim, slot * chunk, chunk))
    return full


def _reduce_scatter_from_global_order(full: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Sum ``full`` (global order) over the group; each rank keeps the sum of its own chunks."""
    cp_size = dist.get_world_size(group)
    local_shape = list(full.shape)
    local_shape[dim] //= cp_size
    chunk = local_shape[dim] // 2
    shards = full.new_empty((cp_size, *local_shape))
    for rank, slot, c in _chunk_slots(cp_size):
        shards[rank].narrow(dim, slot * chunk, chunk).copy_(full.narrow(dim, c * chunk, chunk))
    out = full.new_empty(local_shape)
    # A real reduce-scatter on NCCL. Gloo (torch >= 2.3) runs an all-reduce and keeps this
    # rank's slice, which is the fallback we would otherwise write by hand.
    dist.reduce_scatter_tensor(out.view(-1), shards.view(-1), group=group)
    return out


class _AllGatherSequence(torch.autograd.Function):
    """All-gather CP shards into the full sequence in global order.

    Backward either sums each shard's gradient over all ranks (``sum_grads``: the gathered
    tensor feeds different computations on different ranks, as K and V do) or keeps the local
    rank's slice (the gathered tensor feeds the same computation on every rank).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, sum_grads: bool) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.sum_grads = dim, group, sum_grads
        return _all_gather_in_global_order(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if ctx.sum_grads:
            grad_x = _reduce_scatter_from_global_order(grad, ctx.dim, ctx.group)
        else:
            cp_size, cp_rank = _cp_size_and_rank(ctx.group)
            grad_x = _take_local(grad, ctx.dim, cp_size, cp_rank)
        return grad_x, None, None, None


def split_for_context_parallel(x: torch.Tensor, *, dim: int, cp_group: Any) -> torch.Tensor:
    """Keep this rank's two load-balanced chunks of the full tensor ``x`` along ``dim``.

    Use it on the full batch (tokens, labels, loss mask, position ids) before the model runs. In
    backward each rank gets zeros outside its own tokens; see the module docstring for why.
    """
    cp_size, cp_rank = _cp_size_and_rank(cp_group)
    if cp_size == 1:
        return x
    dim = dim % x.dim()
    _check_divisible(x.shape[dim], cp_size)
    return _take_local(x, dim, cp_size, cp_rank)


def gather_from_context_parallel(x: torch.Tensor, *, dim: int, cp_group: Any) -> torch.Tensor:
    """Reassemble the full tensor, in global order, from every rank's shard ``x`` along ``dim``.

    The inverse of ``split_for_context_parallel``; every rank gets the full tensor. In backward
    each rank keeps the gradient of its own shard, which assumes what follows runs identically on
    every rank.
    """
    cp_size, _ = _cp_size_and_rank(cp_group)
    if cp_size == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % 2:
        raise ShardShapeError(
            f"local sequence length {x.shape[dim]} (dim {dim} of shape {tuple(x.shape)}) is odd, "
            "but a load-balanced shard is two equal chunks; make shards with "
            "split_for_context_parallel"
        )
    return _AllGatherSequence.apply(x, dim, cp_group, False)


def _check_attention_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_size: int
) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShardShapeError(f"expected q, k, v as [batch, heads, seq, head_dim]; {shapes}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ShardShapeError(
            f"k and v must share batch, heads and seq, and q and k batch and head_dim; {shapes}"
        )
    if q.shape[1] % k.shape[1]:
        raise ShardShapeError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}); "
            f"{shapes}"
        )
    if cp_size > 1 and (q.shape[2] != k.shape[2] or q.shape[2] % 2):
        raise ShardShapeError(
            f"with context parallelism q, k and v must be the same load-balanced local shard "
            f"(equal, even seq lengths); {shapes}"
        )


def _causal_mask(
    s_local: int, cp_group: Any, position_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask, True where the query may read the key: key position <= query position."""
    cp_size, cp_rank = _cp_size_and_rank(cp_group)
    if position_ids is None:
        q_pos = cp_local_positions(s_local * cp_size, cp_size, cp_rank, device=device)
        k_pos = torch.arange(s_local * cp_size, device=device)
    else:
        if position_ids.shape[-1] != s_local or position_ids.dim() not in (1, 2):
            raise ShardShapeError(
                f"position_ids must be [s_local] or [batch, s_local] with s_local={s_local}, "
                f"got shape {tuple(position_ids.shape)}"
            )
        q_pos = position_ids.to(device)
        # Key positions travel with the keys, so the mask stays right whatever they are.
        k_pos = q_pos
        if cp_size > 1:
            k_pos = _all_gather_in_global_order(q_pos, q_pos.dim() - 1, cp_group)
    mask = q_pos[..., :, None] >= k_pos[..., None, :]
    # [b, s_q, s_k] broadcasts over heads as [b, 1, s_q, s_k].
    return mask if mask.dim() == 2 else mask[:, None]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cp_group: Any,
    causal: bool = True,
    softmax_scale: float | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run attention for this rank's queries over the keys of the whole sequence.

    ``q`` [b, hq, s_local, d], ``k`` [b, hkv, s_local, d] and ``v`` [b, hkv, s_local, dv] are
    this rank's load-balanced shards. ``hq`` must be a multiple of ``hkv`` (grouped-query
    attention), and ``dv`` may differ from ``d`` (MLA). The result, [b, hq, s_local, dv], equals
    full-sequence attention restricted to the local queries. ``softmax_scale`` defaults to
    ``1 / sqrt(d)``.

    ``position_ids`` ([s_local] or [b, s_local]) are the global positions of the local tokens,
    and the causal mask compares them: a query reads keys at positions <= its own. They default
    to ``cp_local_positions``. Any increasing positions give the same mask; positions that
    restart inside a packed sequence do not make a document mask. They are ignored when
    ``causal`` is False.

    Strategy: all-gather K and V over the CP group, then one SDPA call with a boolean mask built
    from global positions. This is exact and simple, but every rank holds the full K and V, and
    the dense mask keeps SDPA off the flash kernels. A ring (point-to-point) variant that
    overlaps the K/V exchange with compute and never holds the full sequence is a later
    optimisation. Backward reduce-scatters dK and dV, summed over all ranks' queries, to the
    ranks that own those keys.
    """
    cp_size, _ = _cp_size_and_rank(cp_group)
    _check_attention_shapes(q, k, v, cp_size)
    gqa = q.shape[1] != k.shape[1]
    if cp_size == 1 and position_ids is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=gqa
        )
    if cp_size > 1:
        k = _AllGatherSequence.apply(k, 2, cp_group, True)
        v = _AllGatherSequence.apply(v, 2, cp_group, True)
    mask = _causal_mask(q.shape[2], cp_group, position_ids, q.device) if causal else None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa
    )
