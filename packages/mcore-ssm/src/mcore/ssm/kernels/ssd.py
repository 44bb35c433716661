"""Triton kernels for the Mamba-2 SSD scan (forward) and its one-token decoding step.

:func:`ssd_scan_triton` and :func:`ssd_step_triton` take the arguments of
:func:`mcore.ssm.ssd.ssd_scan` and :func:`mcore.ssm.ssd.ssd_step` and compute the same thing.

The scan kernel is fused: one program per (batch row, head, block of ``headdim``) walks the
sequence chunk by chunk, keeping the ``[p, n]`` state in registers. Per chunk it forms the
intra-chunk scores ``(C B^T) * decay * dt`` and applies them to ``x``, adds what the tokens read
from the incoming state, and then moves the state to the chunk's end. The chunks are sequential
inside a program; the parallelism is over batch rows, heads and ``headdim`` blocks. Everything is
computed in fp32 (fp64 inputs too); ``y`` is stored in ``x.dtype``.
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
from torch import Tensor

from mcore.ssm.kernels import block_size, check_device, is_interpreted
from mcore.ssm.ssd import _check_shapes, ssd_scan

__all__ = ["INTERPRETED", "ssd_scan_triton", "ssd_step_triton"]


@triton.jit
def _ssd_step_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    y_ptr,
    heads,
    heads_per_group,
    groups,
    headdim,
    dstate,
    HAS_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (row * heads + head, block of headdim): all of the state's n in one block.
    bh = tl.program_id(0).to(tl.int64)
    row = bh // heads
    head = bh % heads
    group = head // heads_per_group
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask = mask_p[:, None] & mask_n[None, :]

    state_at = state_ptr + bh * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    state = tl.load(state_at, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + bh * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    a = tl.load(a_ptr + head).to(tl.float32)
    bc_at = (row * groups + group) * dstate + offs_n
    b = tl.load(b_ptr + bc_at, mask=mask_n, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + bc_at, mask=mask_n, other=0.0).to(tl.float32)

    state = state * tl.exp(dt * a) + (dt * x)[:, None] * b[None, :]
    tl.store(state_at, state.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(state * c[None, :], axis=1)
    if HAS_D:
        y += tl.load(d_ptr + head).to(tl.float32) * x
    tl.store(y_ptr + bh * headdim + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _ssd_scan_fwd_kernel(
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    init_ptr,
    seq_ptr,
    y_ptr,
    final_ptr,
    seqlen,
    heads,
    heads_per_group,
    groups,
    headdim,
    dstate,
    HAS_D: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (row * heads + head, block of headdim); all tensors contiguous:
    # x, y [b, s, h, p]; dt [b, s, h]; B, C [b, s, g, n]; seq [b, s]; init, final [b, h, p, n].
    bh = tl.program_id(0).to(tl.int64)
    row = bh // heads
    head = bh % heads
    group = head // heads_per_group
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_pn = mask_p[:, None] & mask_n[None, :]
    causal = offs_l[:, None] >= offs_l[None, :]

    a = tl.load(a_ptr + head).to(tl.float32)
    if HAS_D:
        skip = tl.load(d_ptr + head).to(tl.float32)
    state_at = bh * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + state_at, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if HAS_SEQ:
        incoming = tl.load(seq_ptr + row * seqlen)  # sequence the carried state belongs to

    for start in range(0, seqlen, BLOCK_L):
        t = start + offs_l
        mask_t = t < seqlen
        tok = row * seqlen + t  # token index into [b, s]
        x = tl.load(
            x_ptr + (tok[:, None] * heads + head) * headdim + offs_p[None, :],
            mask=mask_t[:, None] & mask_p[None, :],
            other=0.0,
        ).to(tl.float32)
        dt = tl.load(dt_ptr + tok * heads + head, mask=mask_t, other=0.0).to(tl.float32)
        bc_at = (tok[:, None] * groups + group) * dstate + offs_n[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        b = tl.load(b_ptr + bc_at, mask=mask_tn, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + bc_at, mask=mask_tn, other=0.0).to(tl.float32)

        # Padding tokens have dt = 0: no decay, no contribution, so the chunk's end is its
        # last real token's state.
        log_decay = dt * a
        prefix = tl.cumsum(log_decay, axis=0)  # log decay from the chunk's start through t
        total = tl.sum(log_decay, axis=0)
        pair = causal
        reads_start = mask_t
        to_end = tl.exp(tl.minimum(total - prefix, 0.0)) * dt
        carry = tl.exp(total)
        if HAS_SEQ:
            # Past the row's end, repeat its last token's sequence.
            seq = tl.load(seq_ptr + row * seqlen + tl.minimum(t, seqlen - 1))
            last = tl.load(seq_ptr + row * seqlen + tl.minimum(start + BLOCK_L, seqlen) - 1)
            pair = pair & (seq[:, None] == seq[None, :])
            reads_start = reads_start & (seq == incoming)
            to_end = tl.where(seq == last, to_end, 0.0)
            carry = tl.where(last == incoming, carry, 0.0)
            incoming = last

        # Within the chunk: y_i = sum_{j <= i} (C_i . B_j) exp(prefix_i - prefix_j) dt_j x_j.
        scores = tl.dot(c, tl.trans(b), input_precision=PRECISION)
        decay = tl.exp(tl.minimum(prefix[:, None] - prefix[None, :], 0.0))
        scores = tl.where(pair, scores * decay * dt[None, :], 0.0)
        y = tl.dot(scores, x, input_precision=PRECISION)
        # From the state the chunk started with.
        from_start = tl.where(reads_start, tl.exp(prefix), 0.0)
        y += tl.dot(c, tl.trans(state), input_precision=PRECISION) * from_start[:, None]
        if HAS_D:
            y += skip * x
        tl.store(
            y_ptr + (tok[:, None] * heads + head) * headdim + offs_p[None, :],
            y.to(y_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_p[None, :],
        )
        # Move the state to the chunk's end.
        weighted = tl.trans(x * to_end[:, None])
        state = state * carry + tl.dot(weighted, b, input_precision=PRECISION)

    tl.store(final_ptr + state_at, state, mask=mask_pn)


INTERPRETED = is_interpreted(_ssd_scan_fwd_kernel)
"""Whether these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


def _precision(dtype: torch.dtype) -> str:
    """How ``tl.dot`` multiplies its fp32 operands on the GPU.

    For fp32/fp64 inputs, three tf32 products (near-fp32 accuracy on the tensor cores; plain fp32
    "ieee" products compile to far slower code); for 16-bit inputs, one tf32 product is ample.
    """
    return "tf32x3" if dtype in (torch.float32, torch.float64) else "tf32"


def _scan_forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    initial_state: Tensor | None,
    seq_idx: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Launch the scan kernel: ``y`` in ``x.dtype`` and the final state in fp32."""
    b, s, h, p = x.shape
    g, n = B.shape[-2:]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    final = torch.empty(b, h, p, n, dtype=torch.float32, device=x.device)
    if s == 0:
        final.copy_(initial_state if initial_state is not None else torch.zeros_like(final))
        return y, final
    # Sized for the state [BLOCK_P, n] and the [BLOCK_L, BLOCK_L] scores to stay in registers
    # and the dots' operands in shared memory (~64 KiB at n = 128 on sm_90).
    block_p = block_size(p, high=64 if n <= 128 else 32)
    grid = (b * h, triton.cdiv(p, block_p))
    _ssd_scan_fwd_kernel[grid](
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D.contiguous() if D is not None else x,  # a placeholder pointer, never read
        initial_state.contiguous() if initial_state is not None else final,
        seq_idx.contiguous().to(torch.int32) if seq_idx is not None else x,
        y,
        final,
        s,
        h,
        h // g,
        g,
        p,
        n,
        HAS_D=D is not None,
        HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None,
        BLOCK_L=block_size(min(chunk_size, s), high=64),
        BLOCK_P=block_p,
        BLOCK_N=block_size(n),
        PRECISION=_precision(x.dtype),
        num_warps=4,
        # The chunks are sequential through the state: prefetching the next one would cost
        # shared memory that pipelining stages multiply (over 200 KiB at n = 128).
        num_stages=1,
    )
    return y, final


class SsdScanFunction(torch.autograd.Function):
    """The Triton forward of :func:`~mcore.ssm.ssd.ssd_scan`, differentiated through the torch one.

    The backward recomputes the forward with the torch reference under ``torch.enable_grad()``
    and differentiates that with autograd. That costs a second (torch) forward and the
    reference's activation memory, but only during the backward, and it keeps one source of
    truth for the gradients instead of a second hand-written kernel to keep in sync; the forward
    saves only the inputs.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        initial_state: Tensor | None,
        seq_idx: Tensor | None,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        y, final = _scan_forward(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, seq_idx)
        ctx.chunk_size = chunk_size
        return y, final

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_final: Tensor) -> tuple[Tensor | None, ...]:
        x, dt, A, B, C, D, initial_state, seq_idx = ctx.saved_tensors
        differentiable = (x, dt, A, B, C, D, initial_state)
        wants = ctx.needs_input_grad[: len(differentiable)]
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(want) if t is not None else None
                for t, want in zip(differentiable, wants, strict=True)
            ]
            lx, ldt, lA, lB, lC, lD, linit = leaves
            y, final = ssd_scan(
                lx,
                ldt,
                lA,
                lB,
                lC,
                chunk_size=ctx.chunk_size,
                D=lD,
                initial_state=linit,
                seq_idx=seq_idx,
                return_final_state=True,
            )
            # A scalar whose gradient w.r.t. (y, final) is (grad_y, grad_final): autograd.grad
            # then needs no explicit grad_outputs.
            surrogate = (y * grad_y).sum() + (final * grad_final.to(final.dtype)).sum()
            wrt = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(surrogate, wrt)) if wrt else iter(())
        out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*out, None, None)


def ssd_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 128,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`mcore.ssm.ssd.ssd_scan` with a Triton forward (:class:`SsdScanFunction`).

    The kernel walks the sequence in blocks of ``chunk_size`` tokens, rounded to a power of two
    in ``[16, 64]`` (``tl.arange`` needs a power of two and ``tl.dot`` 16; above 64 the scores
    and operands outgrow registers and shared memory); the result does not depend on the
    chunking beyond rounding. The backward recomputes through the torch reference (see
    :class:`SsdScanFunction`).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, heads, headdim], got shape {tuple(x.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    _check_shapes(x, dt, A, B, C, D)
    b, s, h, p = x.shape
    n = B.shape[-1]
    if seq_idx is not None and tuple(seq_idx.shape) != (b, s):
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}, expected {(b, s)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}, expected {(b, h, p, n)}"
        )
    check_device(__name__, INTERPRETED, "ssd_scan_triton", x, dt, A, B, C, D, initial_state)
    y, final = SsdScanFunction.apply(x, dt, A, B, C, D, initial_state, seq_idx, chunk_size)
    return (y, final) if return_final_state else y


def ssd_step_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> Tensor:
    """:func:`mcore.ssm.ssd.ssd_step` as one kernel: updates ``state`` in place, returns ``y``.

    For decoding: not differentiable. The arithmetic is fp32 and the state is stored back in its
    own dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, heads, headdim], got shape {tuple(x.shape)}")
    _check_shapes(x, dt, A, B, C, D)
    b, h, p = x.shape
    g, n = B.shape[-2:]
    if tuple(state.shape) != (b, h, p, n):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(b, h, p, n)}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous: it is updated in place")
    check_device(__name__, INTERPRETED, "ssd_step_triton", state, x, dt, A, B, C, D)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel() == 0:
        return y
    block_p = block_size(p, high=64)
    _ssd_step_kernel[(b * h, triton.cdiv(p, block_p))](
        state,
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D.contiguous() if D is not None else x,  # a placeholder pointer, never read
        y,
        h,
        h // g,
        g,
        p,
        n,
        HAS_D=D is not None,
        BLOCK_P=block_p,
        BLOCK_N=block_size(n),
    )
    return y
