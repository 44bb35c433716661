"""Token permutation for MoE: tokens into expert-major rows before the experts, and back after.

Each function has a torch path (the reference, and what runs without ``fused``) and, with
``fused=True``, a Triton path (:mod:`mcore.moe.kernels.permute`) with Triton backwards. The
fused path runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` set before the first
fused call; anywhere else it raises ``RuntimeError`` instead of falling back, so a run that
asked for the kernels never silently measures the torch path.

Rows are expert-major, as in Megatron: all tokens of expert 0 in ascending token order, then
those of expert 1, and so on.

When every token is routed to the same number of experts (``topk``: plain top-k routing, no
capacity dropping or padding), the torch path moves rows by gathers only: each token's rows are
found by one stable sort of ``sorted_indices``, so the permute's backward and the unpermute sum
a token's ``topk`` rows where they lie instead of scattering into the tokens (``index_add``,
which runs row by row on the CPU).
"""

from __future__ import annotations

import math
from typing import overload

import torch
from torch import Tensor

from mcore.moe import kernels


def tokens_per_expert(routing_map: Tensor) -> Tensor:
    """``[E]`` int64: how many tokens each expert gets: the row count of its block."""
    _check_routing_map(routing_map)
    return routing_map.sum(dim=0, dtype=torch.int64)


@overload
def permute(
    tokens: Tensor,
    routing_map: Tensor,
    probs: Tensor,
    *,
    num_out_tokens: int | None = None,
    fused: bool = False,
    topk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]: ...


@overload
def permute(
    tokens: Tensor,
    routing_map: Tensor,
    probs: None = None,
    *,
    num_out_tokens: int | None = None,
    fused: bool = False,
    topk: int | None = None,
) -> tuple[Tensor, None, Tensor]: ...


def permute(
    tokens: Tensor,
    routing_map: Tensor,
    probs: Tensor | None = None,
    *,
    num_out_tokens: int | None = None,
    fused: bool = False,
    topk: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gather each token once per expert it is routed to, expert-major, so experts see one block.

    ``tokens`` ``[T, H]``; ``routing_map`` bool ``[T, E]``; ``probs`` ``[T, E]`` (zero where not
    routed) or None. Returns ``(permuted [N, H], permuted_probs [N] or None, sorted_indices [N])``
    where ``sorted_indices`` (int64) is the source token of each row. Differentiable w.r.t.
    ``tokens`` and ``probs``.

    ``N`` is ``routing_map.sum()``, read on the host (a device sync), unless ``num_out_tokens``
    gives it (no sync). Then only the first ``N`` routed pairs are kept if there are more, and if
    there are fewer the tail rows are zero rows of token 0 with probability 0.

    ``topk`` says every row of ``routing_map`` has exactly ``topk`` experts (not checked: a check
    would read the device). The torch path then sizes the rows as ``T * topk`` without a sync
    and its backward gathers each token's rows rather than scattering them; the fused path
    ignores it. ``num_out_tokens``, if given, must then be ``T * topk``.
    """
    _check_routing_map(routing_map)
    if tokens.dim() != 2 or tokens.shape[0] != routing_map.shape[0]:
        raise ValueError(
            f"permute: tokens must be [T, H] with T = routing_map.shape[0] = "
            f"{routing_map.shape[0]}; got {tuple(tokens.shape)}"
        )
    if probs is not None and probs.shape != routing_map.shape:
        raise ValueError(
            f"permute: probs must have routing_map's shape {tuple(routing_map.shape)}; got "
            f"{tuple(probs.shape)} (scatter top-k probs into [T, E] first)"
        )
    if num_out_tokens is not None and num_out_tokens < 0:
        raise ValueError(f"permute: num_out_tokens must be >= 0; got {num_out_tokens}")
    if topk is not None:
        _check_topk("permute", topk, routing_map.shape[0], num_out_tokens)
    if fused:
        fn = kernels.load("permute", "permute", tokens, routing_map, probs).PermuteFunction
        return fn.apply(tokens, probs, routing_map, num_out_tokens)
    if topk is not None:
        return _permute_topk(tokens, routing_map, probs, topk)
    return _permute_torch(tokens, routing_map, probs, num_out_tokens)


def unpermute(
    permuted: Tensor,
    sorted_indices: Tensor,
    num_tokens: int,
    *,
    probs: Tensor | None = None,
    fused: bool = False,
    topk: int | None = None,
) -> Tensor:
    """Undo :func:`permute`: each token becomes the sum of its rows, weighted by ``probs``.

    ``out[t] = sum of permuted[r] * probs[r] over rows r with sorted_indices[r] == t``, where
    ``probs`` is the permuted ``[N]`` probabilities (weight 1 when None). Sums run in fp32 for
    16-bit inputs (in the inputs' dtype for fp32/fp64); the result has ``permuted``'s dtype.
    Differentiable w.r.t. ``permuted`` and ``probs``.

    ``topk`` says every token has exactly ``topk`` rows (``N = num_tokens * topk``, each token
    ``topk`` times in ``sorted_indices``; only the count is checked): the torch path then gathers
    each token's rows and sums them, and its backward gathers too; the fused path ignores it.
    """
    if permuted.dim() != 2 or sorted_indices.shape != (permuted.shape[0],):
        raise ValueError(
            f"unpermute: permuted must be [N, H] and sorted_indices [N]; got "
            f"{tuple(permuted.shape)} and {tuple(sorted_indices.shape)}"
        )
    if probs is not None and probs.shape != sorted_indices.shape:
        raise ValueError(
            f"unpermute: probs must be the permuted probs [N] = {tuple(sorted_indices.shape)}; "
            f"got {tuple(probs.shape)}"
        )
    if topk is not None:
        _check_topk("unpermute", topk, num_tokens, permuted.shape[0])
    if fused:
        fn = kernels.load("permute", "unpermute", permuted, sorted_indices, probs)
        return fn.UnpermuteFunction.apply(permuted, probs, sorted_indices, num_tokens)
    if topk is not None:
        return _UnpermuteTopK.apply(permuted, probs, sorted_indices, topk)
    acc_dtype = torch.promote_types(permuted.dtype, torch.float32)
    rows = permuted.to(acc_dtype)
    if probs is not None:
        rows = rows * probs.to(acc_dtype).unsqueeze(1)
    out = rows.new_zeros(num_tokens, permuted.shape[1]).index_add(0, sorted_indices, rows)
    return out.to(permuted.dtype)


@overload
def sort_chunks_by_index(
    x: Tensor,
    split_sizes: Tensor | list[int],
    order: list[int] | Tensor,
    *,
    probs: Tensor,
    fused: bool = False,
) -> tuple[Tensor, Tensor]: ...


@overload
def sort_chunks_by_index(
    x: Tensor,
    split_sizes: Tensor | list[int],
    order: list[int] | Tensor,
    *,
    probs: None = None,
    fused: bool = False,
) -> tuple[Tensor, None]: ...


def sort_chunks_by_index(
    x: Tensor,
    split_sizes: Tensor | list[int],
    order: list[int] | Tensor,
    *,
    probs: Tensor | None = None,
    fused: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Reorder the chunks of ``x`` (sizes ``split_sizes`` along dim 0) into ``order``.

    The all-to-all dispatcher uses it to turn (source rank, expert) order into (expert, source
    rank) order. ``order`` is a permutation of the chunk ids; ``probs`` ``[N]`` is reordered the
    same way. Differentiable. The torch path reads tensor ``split_sizes``/``order`` on the host
    (a sync); the fused path does not, and so cannot check them: they must be valid.
    """
    num_chunks = len(split_sizes)
    if isinstance(split_sizes, list) and sum(split_sizes) != x.shape[0]:
        raise ValueError(
            f"sort_chunks_by_index: split_sizes {split_sizes} sum to {sum(split_sizes)}, but x "
            f"has {x.shape[0]} rows"
        )
    if len(order) != num_chunks:
        raise ValueError(
            f"sort_chunks_by_index: order must list all {num_chunks} chunks; got {len(order)}"
        )
    if probs is not None and probs.shape != (x.shape[0],):
        raise ValueError(
            f"sort_chunks_by_index: probs must be [{x.shape[0]}]; got {tuple(probs.shape)}"
        )
    if not isinstance(order, Tensor):
        _check_chunk_order(order, num_chunks)
        if list(order) == list(range(num_chunks)):
            return x, probs  # already in order (one rank, or one chunk): nothing to move
    if fused:
        module = kernels.load("permute", "sort_chunks_by_index", x, probs)
        sizes = torch.as_tensor(split_sizes, dtype=torch.int64, device=x.device)
        index = torch.as_tensor(order, dtype=torch.int64, device=x.device)
        row_map = module.chunk_row_map(sizes, index, x.shape[0])
        flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 is ambiguous with no rows
        out, out_probs = module.SortChunksFunction.apply(flat, probs, row_map)
        return out.view(x.shape), out_probs
    sizes = split_sizes.tolist() if isinstance(split_sizes, Tensor) else list(split_sizes)
    chunk_order = order.tolist() if isinstance(order, Tensor) else list(order)
    _check_chunk_order(chunk_order, num_chunks)
    chunks = torch.split(x, sizes)
    out = torch.cat([chunks[i] for i in chunk_order])
    if probs is None:
        return out, None
    prob_chunks = torch.split(probs, sizes)
    return out, torch.cat([prob_chunks[i] for i in chunk_order])


def _check_chunk_order(order: list[int], num_chunks: int) -> None:
    if sorted(order) != list(range(num_chunks)):
        raise ValueError(
            f"sort_chunks_by_index: order must be a permutation of 0..{num_chunks - 1}; got {order}"
        )


def _check_topk(what: str, topk: int, num_tokens: int, num_rows: int | None) -> None:
    if topk < 1:
        raise ValueError(f"{what}: topk must be >= 1; got {topk}")
    if num_rows is not None and num_rows != num_tokens * topk:
        raise ValueError(
            f"{what}: with topk={topk}, {num_tokens} tokens make {num_tokens * topk} rows; got "
            f"{num_rows}"
        )


def _check_routing_map(routing_map: Tensor) -> None:
    if routing_map.dtype != torch.bool or routing_map.dim() != 2:
        raise ValueError(
            f"routing_map must be a bool [tokens, experts] tensor; got {routing_map.dtype} "
            f"{tuple(routing_map.shape)}"
        )


def _permute_torch(
    tokens: Tensor, routing_map: Tensor, probs: Tensor | None, num_out_tokens: int | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    num_tokens = routing_map.shape[0]
    # Flat index e * T + t over the (expert, token) pairs: ascending order is expert-major.
    expert_major = routing_map.t().reshape(-1)
    if num_out_tokens is None:
        pairs = expert_major.nonzero().squeeze(1)  # the row count sets the shape: a host sync
        valid = None
    else:
        pairs, valid = _first_routed_pairs(expert_major, num_out_tokens)
    sorted_indices = pairs % num_tokens
    permuted = tokens.index_select(0, sorted_indices)
    permuted_probs = None
    if probs is not None:
        permuted_probs = probs.t().reshape(-1).index_select(0, pairs)
    if valid is not None:
        # where, not a multiply: padding rows must be zero even when token 0 holds inf or nan.
        permuted = torch.where(valid.unsqueeze(1), permuted, 0)
        if permuted_probs is not None:
            permuted_probs = torch.where(valid, permuted_probs, 0)
    return permuted, permuted_probs, sorted_indices


def _first_routed_pairs(expert_major: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """The flat indices of the first ``num_rows`` routed pairs and which rows are real, no sync.

    Rows past the routed pairs get pair 0 (token 0, expert 0) and ``valid`` False.
    """
    rank = torch.cumsum(expert_major, 0) - 1
    # Unrouted and surplus pairs all land in one extra slot that is then cut off.
    slot = torch.where(expert_major & (rank < num_rows), rank, num_rows)
    pairs = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=expert_major.device)
    flat = torch.arange(expert_major.numel(), device=expert_major.device)
    pairs = pairs.scatter(0, slot, flat)[:num_rows]
    valid = pairs >= 0
    return pairs.clamp(min=0), valid


# --- every token routed to topk experts: gathers only -----------------------------------------


def _token_major(sorted_indices: Tensor) -> Tensor:
    """The rows of each token together, in row (expert) order: ``[T * topk]`` row indices."""
    return torch.sort(sorted_indices, stable=True).indices


def _permute_topk(
    tokens: Tensor, routing_map: Tensor, probs: Tensor | None, topk: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    num_tokens = routing_map.shape[0]
    expert_major = routing_map.t().reshape(-1)
    # Exactly T * topk routed pairs: the row count is known, so no sync and no padding rows.
    pairs = torch.nonzero_static(expert_major, size=num_tokens * topk).squeeze(1)
    sorted_indices = pairs % num_tokens
    permuted = _GatherTokens.apply(tokens, sorted_indices, topk)
    permuted_probs = None
    if probs is not None:
        permuted_probs = probs.t().reshape(-1).index_select(0, pairs)
    return permuted, permuted_probs, sorted_indices


class _GatherTokens(torch.autograd.Function):
    """``tokens[sorted_indices]``, each token ``topk`` times; the backward sums each token's
    rows by gathering them together (a sort of the indices) instead of ``index_add``."""

    @staticmethod
    def forward(ctx, tokens: Tensor, sorted_indices: Tensor, topk: int) -> Tensor:
        ctx.save_for_backward(sorted_indices)
        ctx.topk, ctx.num_tokens = topk, tokens.shape[0]
        return tokens.index_select(0, sorted_indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (sorted_indices,) = ctx.saved_tensors
        rows = grad.index_select(0, _token_major(sorted_indices))
        return rows.view(ctx.num_tokens, ctx.topk, grad.shape[1]).sum(dim=1), None, None


class _UnpermuteTopK(torch.autograd.Function):
    """:func:`unpermute` when every token has ``topk`` rows: gather each token's rows together
    and sum them, weighted (one batched ``[1, topk] @ [topk, H]`` product per token); the
    backward gathers the tokens' gradients onto the rows."""

    @staticmethod
    def forward(ctx, rows: Tensor, probs: Tensor | None, sorted_indices: Tensor, topk: int):
        acc = torch.promote_types(rows.dtype, torch.float32)
        num_tokens, hidden = rows.shape[0] // topk, rows.shape[1]
        order = _token_major(sorted_indices)
        grouped = rows.index_select(0, order).to(acc).view(num_tokens, topk, hidden)
        if probs is None:
            out = grouped.sum(dim=1)
        else:
            weights = probs.to(acc).index_select(0, order).view(num_tokens, 1, topk)
            out = torch.bmm(weights, grouped).view(num_tokens, hidden)
        ctx.save_for_backward(rows, probs, sorted_indices)
        return out.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, probs, sorted_indices = ctx.saved_tensors
        acc = torch.promote_types(rows.dtype, torch.float32)
        grad_rows = grad.index_select(0, sorted_indices).to(acc)
        grad_probs = None
        if probs is not None and ctx.needs_input_grad[1]:
            # Each row's dot product with its token's gradient: one [1, H] @ [H, 1] per row.
            dots = torch.bmm(grad_rows.unsqueeze(1), rows.to(acc).unsqueeze(2))
            grad_probs = dots.view(rows.shape[0]).to(probs.dtype)
        if probs is not None:
            grad_rows = grad_rows.mul_(probs.to(acc).unsqueeze(1))  # a fresh gather: ours
        return grad_rows.to(rows.dtype), grad_probs, None, None
