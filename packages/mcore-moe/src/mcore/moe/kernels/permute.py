"""Triton kernels that move token rows into expert order and back, with Triton backwards.

Which rows go where is decided in torch with a cumsum (no host sync) and handed to the kernels
as index maps:

- ``row_id_map`` ``[T, E]`` int32: the row of token ``t`` for expert ``e`` in the permuted
  output, or -1. Permute scatters each token to its rows through it; its backward sums them back.
- ``sorted_indices`` ``[N]`` int64: the token of each permuted row. Unpermute sums each token's
  rows, found through a CSR index built by a stable sort, so the sum runs in row order and is
  deterministic (no atomics).

All tensors reaching a kernel are contiguous, so rows are ``hidden`` elements apart. Row offsets
are computed in int64 because ``rows * hidden`` overflows int32 at realistic sizes.
"""

# Triton kernels are beyond the type checker: launch arguments bound to tl.constexpr
# parameters, launch options (num_warps), tl.static_range loops and names a constexpr branch
# defines. Their tests check them against the torch references instead.
# pyright: reportArgumentType=false, reportCallIssue=false, reportGeneralTypeIssues=false
# pyright: reportPossiblyUnboundVariable=false

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from mcore.moe.kernels import block_size, is_interpreted


@triton.jit
def _permute_kernel(
    tokens_ptr,
    probs_ptr,
    row_id_map_ptr,
    out_ptr,
    out_probs_ptr,
    sorted_indices_ptr,
    num_experts,
    hidden,
    HAS_PROBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per token: the map row is read once, and a token with k experts costs k copies.
    t = tl.program_id(0).to(tl.int64)
    for e in range(num_experts):
        dst = tl.load(row_id_map_ptr + t * num_experts + e).to(tl.int64)
        if dst >= 0:
            for h0 in range(0, hidden, BLOCK_H):
                offs = h0 + tl.arange(0, BLOCK_H)
                mask = offs < hidden
                row = tl.load(tokens_ptr + t * hidden + offs, mask=mask)
                tl.store(out_ptr + dst * hidden + offs, row, mask=mask)
            tl.store(sorted_indices_ptr + dst, t)
            if HAS_PROBS:
                tl.store(out_probs_ptr + dst, tl.load(probs_ptr + t * num_experts + e))


@triton.jit
def _sum_rows_kernel(
    rows_ptr,
    row_probs_ptr,
    index_ptr,
    index_start_ptr,
    out_ptr,
    hidden,
    width,
    DENSE: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # out[t] = sum of rows[r] (* row_probs[r]) over token t's rows, in fp32 whatever the dtype.
    # DENSE: index is [T, width] with -1 for "no row" (a row_id_map); else CSR, token t's rows
    # being index[index_start[t]:index_start[t + 1]].
    t = tl.program_id(0).to(tl.int64)
    if DENSE:
        start = t * width
        end = start + width
    else:
        start = tl.load(index_start_ptr + t)
        end = tl.load(index_start_ptr + t + 1)
    for h0 in range(0, hidden, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < hidden
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in range(start, end):
            r = tl.load(index_ptr + i).to(tl.int64)
            if r >= 0:
                row = tl.load(rows_ptr + r * hidden + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_PROBS:
                    row = row * tl.load(row_probs_ptr + r).to(tl.float32)
                acc += row
        tl.store(out_ptr + t * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _probs_from_rows_kernel(
    row_probs_ptr, row_id_map_ptr, probs_ptr, num_experts, BLOCK_E: tl.constexpr
):
    # probs[t, e] = row_probs[row_id_map[t, e]], or 0 where the token has no row for e.
    t = tl.program_id(0).to(tl.int64)
    for e0 in range(0, num_experts, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        mask = offs < num_experts
        row = tl.load(row_id_map_ptr + t * num_experts + offs, mask=mask, other=-1).to(tl.int64)
        value = tl.load(row_probs_ptr + row, mask=row >= 0, other=0.0)
        tl.store(probs_ptr + t * num_experts + offs, value, mask=mask)


@triton.jit
def _unpermute_bwd_kernel(
    grad_out_ptr,
    rows_ptr,
    row_probs_ptr,
    sorted_indices_ptr,
    grad_rows_ptr,
    grad_row_probs_ptr,
    hidden,
    HAS_PROBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per permuted row, looping over the hidden dim so that the probability's
    # gradient, a dot product over the whole row, needs no atomics.
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(sorted_indices_ptr + r).to(tl.int64)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < hidden
        grad = tl.load(grad_out_ptr + t * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_PROBS:
            row = tl.load(rows_ptr + r * hidden + offs, mask=mask, other=0.0).to(tl.float32)
            dot += grad * row
            grad = grad * tl.load(row_probs_ptr + r).to(tl.float32)
        tl.store(
            grad_rows_ptr + r * hidden + offs, grad.to(grad_rows_ptr.dtype.element_ty), mask=mask
        )
    if HAS_PROBS:
        tl.store(grad_row_probs_ptr + r, tl.sum(dot).to(grad_row_probs_ptr.dtype.element_ty))


@triton.jit
def _move_rows_kernel(
    src_ptr,
    src_probs_ptr,
    index_ptr,
    dst_ptr,
    dst_probs_ptr,
    hidden,
    SCATTER: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Row i moves to index[i] (SCATTER) or comes from index[i] (gather, the inverse): one
    # kernel serves a permutation of rows and its backward.
    i = tl.program_id(0).to(tl.int64)
    j = tl.load(index_ptr + i).to(tl.int64)
    if SCATTER:
        src_row = i
        dst_row = j
    else:
        src_row = j
        dst_row = i
    for h0 in range(0, hidden, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < hidden
        row = tl.load(src_ptr + src_row * hidden + offs, mask=mask)
        tl.store(dst_ptr + dst_row * hidden + offs, row, mask=mask)
    if HAS_PROBS:
        tl.store(dst_probs_ptr + dst_row, tl.load(src_probs_ptr + src_row))


INTERPRETED = is_interpreted(_permute_kernel)
"""Whether these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


def _row_id_map(routing_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[T, E]`` int32: each (token, expert) pair's row in expert-major order, -1 if none."""
    num_tokens, num_experts = routing_map.shape
    expert_major = routing_map.t().reshape(-1)
    rows = torch.cumsum(expert_major, 0, dtype=torch.int32) - 1
    # Pairs past num_rows are dropped, like capacity-dropped tokens.
    rows = torch.where(expert_major & (rows < num_rows), rows, -1)
    return rows.view(num_experts, num_tokens).t().contiguous()


def _sum_rows(
    rows: torch.Tensor,
    row_probs: torch.Tensor | None,
    index: torch.Tensor,
    index_start: torch.Tensor | None,
    num_tokens: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch ``_sum_rows_kernel``; dense ``index`` ``[T, width]`` when ``index_start`` is None."""
    hidden = rows.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=rows.device)
    if num_tokens and hidden:
        dense = index_start is None
        _sum_rows_kernel[(num_tokens,)](
            rows,
            row_probs if row_probs is not None else rows,
            index,
            index if dense else index_start,
            out,
            hidden,
            index.shape[1] if dense else 0,
            DENSE=dense,
            HAS_PROBS=row_probs is not None,
            BLOCK_H=block_size(hidden),
        )
    return out


class PermuteFunction(torch.autograd.Function):
    """Tokens ``[T, H]`` (and probs ``[T, E]``) to expert-major rows ``[N, H]`` (and ``[N]``)."""

    @staticmethod
    def forward(
        ctx: Any,
        tokens: torch.Tensor,
        probs: torch.Tensor | None,
        routing_map: torch.Tensor,
        num_out_tokens: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        tokens = tokens.contiguous()
        num_tokens, hidden = tokens.shape
        num_experts = routing_map.shape[1]
        # Without an explicit row count the routing map is summed on the host (a sync); with one,
        # rows past the routed pairs stay zero rows of token 0 with probability 0.
        padded = num_out_tokens is not None
        num_rows = int(routing_map.sum()) if num_out_tokens is None else num_out_tokens
        row_id_map = _row_id_map(routing_map, num_rows)
        alloc = torch.zeros if padded else torch.empty
        out = alloc(num_rows, hidden, dtype=tokens.dtype, device=tokens.device)
        sorted_indices = alloc(num_rows, dtype=torch.int64, device=tokens.device)
        out_probs = None
        if probs is not None:
            probs = probs.contiguous()
            out_probs = alloc(num_rows, dtype=probs.dtype, device=probs.device)
        if num_tokens and num_experts:
            _permute_kernel[(num_tokens,)](
                tokens,
                probs if probs is not None else tokens,
                row_id_map,
                out,
                out_probs if out_probs is not None else out,
                sorted_indices,
                num_experts,
                hidden,
                HAS_PROBS=probs is not None,
                BLOCK_H=block_size(hidden),
            )
        ctx.save_for_backward(row_id_map)
        ctx.num_tokens = num_tokens
        ctx.tokens_dtype = tokens.dtype
        ctx.probs_dtype = probs.dtype if probs is not None else None
        ctx.mark_non_differentiable(sorted_indices)
        return out, out_probs, sorted_indices

    @staticmethod
    def backward(
        ctx: Any,
        grad_out: torch.Tensor,
        grad_out_probs: torch.Tensor | None,
        _grad_sorted_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (row_id_map,) = ctx.saved_tensors
        grad_tokens = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_tokens = _sum_rows(
                grad_out.contiguous(), None, row_id_map, None, ctx.num_tokens, ctx.tokens_dtype
            )
        if ctx.needs_input_grad[1] and grad_out_probs is not None:
            num_experts = row_id_map.shape[1]
            grad_probs = torch.empty(
                ctx.num_tokens, num_experts, dtype=ctx.probs_dtype, device=row_id_map.device
            )
            if ctx.num_tokens and num_experts:
                _probs_from_rows_kernel[(ctx.num_tokens,)](
                    grad_out_probs.contiguous(),
                    row_id_map,
                    grad_probs,
                    num_experts,
                    BLOCK_E=block_size(num_experts, cap=256),
                )
        return grad_tokens, grad_probs, None, None


class UnpermuteFunction(torch.autograd.Function):
    """Rows ``[N, H]`` back to tokens ``[T, H]``: each token the (prob-weighted) sum of its rows."""

    @staticmethod
    def forward(
        ctx: Any,
        permuted: torch.Tensor,
        row_probs: torch.Tensor | None,
        sorted_indices: torch.Tensor,
        num_tokens: int,
    ) -> torch.Tensor:
        permuted = permuted.contiguous()
        row_probs = row_probs.contiguous() if row_probs is not None else None
        # CSR by token: a stable sort keeps each token's rows in row order (deterministic sums);
        # the counts come from a scatter-add, which, unlike bincount, needs no host sync.
        order = torch.sort(sorted_indices, stable=True).indices
        counts = torch.zeros(num_tokens + 1, dtype=torch.int64, device=permuted.device)
        counts.index_add_(0, sorted_indices + 1, torch.ones_like(sorted_indices))
        starts = torch.cumsum(counts, 0)
        out = _sum_rows(permuted, row_probs, order, starts, num_tokens, permuted.dtype)
        ctx.save_for_backward(
            permuted if row_probs is not None else None, row_probs, sorted_indices
        )
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        permuted, row_probs, sorted_indices = ctx.saved_tensors
        num_rows = sorted_indices.shape[0]
        hidden = grad_out.shape[1]
        grad_out = grad_out.contiguous()
        grad_rows = torch.empty(num_rows, hidden, dtype=grad_out.dtype, device=grad_out.device)
        grad_row_probs = torch.empty_like(row_probs) if row_probs is not None else None
        if num_rows and hidden:
            _unpermute_bwd_kernel[(num_rows,)](
                grad_out,
                permuted if permuted is not None else grad_out,
                row_probs if row_probs is not None else grad_out,
                sorted_indices,
                grad_rows,
                grad_row_probs if grad_row_probs is not None else grad_rows,
                hidden,
                HAS_PROBS=row_probs is not None,
                BLOCK_H=block_size(hidden),
            )
        elif grad_row_probs is not None:
            grad_row_probs.zero_()
        return grad_rows, grad_row_probs, None, None


def chunk_row_map(split_sizes: torch.Tensor, order: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows]`` int64: where each row goes when the chunks are reordered by ``order``."""
    ends = torch.cumsum(split_sizes, 0)
    starts = ends - split_sizes
    sizes_in_order = split_sizes[order]
    dst_starts = torch.empty_like(starts)
    dst_starts[order] = torch.cumsum(sizes_in_order, 0) - sizes_in_order
    rows = torch.arange(num_rows, device=split_sizes.device)
    # right=True skips empty chunks: a row belongs to the first chunk that ends after it.
    chunk = torch.searchsorted(ends, rows, right=True)
    return dst_starts[chunk] + rows - starts[chunk]


def _move_rows(
    x: torch.Tensor, probs: torch.Tensor | None, index: torch.Tensor, *, scatter: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_move_rows_kernel`` over every row of ``x``."""
    num_rows, hidden = x.shape
    out = torch.empty_like(x)
    out_probs = torch.empty_like(probs) if probs is not None else None
    if num_rows:
        _move_rows_kernel[(num_rows,)](
            x,
            probs if probs is not None else x,
            index,
            out,
            out_probs if out_probs is not None else out,
            hidden,
            SCATTER=scatter,
            HAS_PROBS=probs is not None,
            BLOCK_H=block_size(hidden),
        )
    return out, out_probs


class SortChunksFunction(torch.autograd.Function):
    """Reorder the rows of ``x`` ``[N, H]`` (and ``probs`` ``[N]``) by a row map."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, probs: torch.Tensor | None, row_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctx.save_for_backward(row_map)
        x = x.contiguous()
        probs = probs.contiguous() if probs is not None else None
        return _move_rows(x, probs, row_map, scatter=True)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, grad_out_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        (row_map,) = ctx.saved_tensors
        # The inverse permutation is a gather through the same map.
        grad_x, grad_probs = _move_rows(
            grad_out.contiguous(),
            grad_out_probs.contiguous() if grad_out_probs is not None else None,
            row_map,
            scatter=False,
        )
        return grad_x, grad_probs, None
