"""Triton kernels for the gated delta rule: the decode step and the forward of the chunked scan.

Same signatures and semantics as :mod:`mcore.ssm.gated_delta`, which stays the reference. The
scan kernel gives one program to each (batch, head, block of ``dv``) and walks the chunks in
order with the state block in registers; each chunk does the UT transform of the torch path, the
unit lower-triangular inverse taken as the product ``(I + M)(I + M^2)(I + M^4)...`` of the
nilpotent ``M`` (``log2(chunk)`` squarings, all matmuls). Arithmetic is fp32 (``tl.dot`` in IEEE
precision, not TF32). Its backward recomputes through the torch reference.

Triton decides when this module is imported whether the kernels are compiled for the GPU or run
by its CPU interpreter (``TRITON_INTERPRET=1``); the functions check that they can run on the
tensors given and say what to do instead of failing inside Triton.
"""

# Triton kernels are beyond the type checker: launch arguments bound to tl.constexpr
# parameters, launch options (num_warps), tl.static_range loops and names a constexpr branch
# defines. Their tests check them against the torch references instead.
# pyright: reportArgumentType=false, reportCallIssue=false, reportGeneralTypeIssues=false
# pyright: reportPossiblyUnboundVariable=false

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from mcore.ssm.gated_delta import (
    L2NORM_EPS,
    check_inputs,
    gated_delta_rule,
    segment_ids,
)

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError as error:
    raise ImportError(
        f"mcore.ssm.kernels.gated_delta needs Triton, which failed to import ({error}); install "
        "the mcore-ssm[triton] extra, or use mcore.ssm.gated_delta (the torch path)"
    ) from error

__all__ = ["INTERPRETED", "gated_delta_rule_triton", "gated_delta_step_triton"]

_TRUTHY = {"1", "true", "yes", "on", "y"}  # what Triton accepts for TRITON_INTERPRET


@triton.jit
def _step_kernel(
    state_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    out_ptr,
    dk,
    dv,
    scale,
    EPS: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    # One (batch, head) and one block of dv columns of its state; q, k whole (for the norm).
    bh = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < dk, offs_v < dv
    q = tl.load(q_ptr + bh * dk + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bh * dk + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    beta = tl.load(beta_ptr + bh).to(tl.float32)
    if USE_L2NORM:
        q = q * tl.rsqrt(tl.sum(q * q, 0) + EPS)
        k = k * tl.rsqrt(tl.sum(k * k, 0) + EPS)
    q = q * scale

    ptrs = state_ptr + bh * dk * dv + offs_k[:, None] * dv + offs_v[None, :]
    mask = mask_k[:, None] & mask_v[None, :]
    state = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * decay
    delta = beta * (v - tl.sum(state * k[:, None], 0))
    state += k[:, None] * delta[None, :]
    out = tl.sum(state * q[:, None], 0)
    tl.store(ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + bh * dv + offs_v, out.to(out_ptr.dtype.element_ty), mask=mask_v)


@triton.jit
def _scan_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    seg_ptr,
    init_ptr,
    out_ptr,
    final_ptr,
    seqlen,
    heads,
    dk,
    dv,
    scale,
    EPS: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEG: tl.constexpr,
    CHUNK: tl.constexpr,
    LOG2_CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    # Inputs [b, s, h, d] contiguous; g, beta [b, s, h]; seg [b, s]; states [b, h, dk, dv] fp32.
    bh = tl.program_id(0).to(tl.int64)
    batch, head = bh // heads, bh % heads
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < dk, offs_v < dv
    state_ptrs = bh * dk * dv + offs_k[:, None] * dv + offs_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + state_ptrs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    if HAS_SEG:
        seg_before = tl.load(seg_ptr + batch * seqlen)  # the initial state's sequence

    for start in range(0, seqlen, CHUNK):
        pos = start + offs_c
        mask_t = pos < seqlen
        tok = (batch * seqlen + pos) * heads + head
        # Tokens past the end load as k = v = beta = g = 0: they change nothing.
        mask_qk = mask_t[:, None] & mask_k[None, :]
        q = tl.load(q_ptr + tok[:, None] * dk + offs_k[None, :], mask=mask_qk, other=0.0)
        k = tl.load(k_ptr + tok[:, None] * dk + offs_k[None, :], mask=mask_qk, other=0.0)
        mask_tv = mask_t[:, None] & mask_v[None, :]
        v = tl.load(v_ptr + tok[:, None] * dv + offs_v[None, :], mask=mask_tv, other=0.0)
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
        g = tl.load(g_ptr + tok, mask=mask_t, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + tok, mask=mask_t, other=0.0).to(tl.float32)
        if USE_L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, 1) + EPS)[:, None]
            k = k * tl.rsqrt(tl.sum(k * k, 1) + EPS)[:, None]
        q = q * scale

        log_decay = tl.cumsum(g, 0)
        last = tl.sum(tl.where(offs_c == CHUNK - 1, log_decay, 0.0), 0)
        keep = causal
        if HAS_SEG:
            # Decays count only inside one sequence (see the torch reference).
            seg = tl.load(seg_ptr + batch * seqlen + pos, mask=mask_t, other=-1)
            seg_last = tl.max(seg, 0)
            keep = keep & (seg[:, None] == seg[None, :])
            start_decay = tl.where(seg == seg_before, tl.exp(log_decay), 0.0)
            end_decay = tl.where(seg == seg_last, tl.exp(last - log_decay), 0.0)
            chunk_decay = tl.where(seg_last == seg_before, tl.exp(last), 0.0)
            seg_before = seg_last
        else:
            start_decay = tl.exp(log_decay)
            end_decay = tl.exp(last - log_decay)
            chunk_decay = tl.exp(last)
        pair = log_decay[:, None] - log_decay[None, :]
        pair_decay = tl.exp(tl.where(keep, pair, float("-inf")))

        # (I + A) u = beta v - beta start_decay k S_0, A strictly lower; (I + A)^-1 = sum of
        # (-A)^j, j < CHUNK, = (I + M)(I + M^2)...(I + M^(CHUNK/2)) with M = -A.
        kk = tl.dot(k, tl.trans(k), input_precision="ieee")
        power = tl.where(strict, -beta[:, None] * kk * pair_decay, 0.0)
        inverse = eye + power
        for _ in tl.static_range(LOG2_CHUNK - 1):
            power = tl.dot(power, power, input_precision="ieee")
            inverse += tl.dot(inverse, power, input_precision="ieee")
        bk = k * beta[:, None]
        w = tl.dot(inverse, bk * start_decay[:, None], input_precision="ieee")
        u = tl.dot(inverse, v * beta[:, None], input_precision="ieee")
        u -= tl.dot(w, state, input_precision="ieee")

        attn = tl.dot(q, tl.trans(k), input_precision="ieee") * pair_decay
        out = tl.dot(q * start_decay[:, None], state, input_precision="ieee")
        out += tl.dot(attn, u, input_precision="ieee")
        out_ptrs = out_ptr + tok[:, None] * dv + offs_v[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_tv)

        k_end = k * end_decay[:, None]
        state = state * chunk_decay + tl.dot(tl.trans(k_end), u, input_precision="ieee")

    tl.store(final_ptr + state_ptrs, state, mask=state_mask)


INTERPRETED = not isinstance(_scan_fwd_kernel, JITFunction)
"""Whether these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


def _block(n: int, cap: int) -> int:
    """The power-of-two block, at least 16 (``tl.dot``'s minimum), for a dimension of ``n``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _check_can_run(what: str, *tensors: Tensor | None) -> None:
    """Raise ``RuntimeError`` unless the kernels can run on ``tensors`` (CUDA, or interpreted)."""
    devices = sorted({str(t.device) for t in tensors if t is not None})
    if len(devices) > 1:
        raise RuntimeError(f"{what}: the tensors are on different devices {devices}; use one")
    if INTERPRETED or all(t.is_cuda for t in tensors if t is not None):
        return
    if os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUTHY:
        raise RuntimeError(
            f"{what} got tensors on {devices}: TRITON_INTERPRET is set, but only after "
            "mcore.ssm.kernels.gated_delta was imported, and Triton reads it when the kernels "
            "are defined; set it before the first import in the process"
        )
    raise RuntimeError(
        f"{what} needs CUDA tensors (got {devices}), or TRITON_INTERPRET=1 set before "
        "mcore.ssm.kernels.gated_delta is imported to run the kernels on the CPU (slowly); "
        "mcore.ssm.gated_delta is the torch path"
    )


def _scan_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int,
    initial_state: Tensor | None,
    seq_idx: Tensor | None,
    use_qk_l2norm: bool,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """Launch the scan kernel: ``o`` in ``v.dtype`` and the final state in fp32."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    out = torch.empty(b, s, h, dv, dtype=v.dtype, device=v.device)
    final = torch.empty(b, h, dk, dv, dtype=torch.float32, device=v.device)
    seg = None if seq_idx is None else segment_ids(seq_idx).contiguous()
    init = None if initial_state is None else initial_state.float().contiguous()
    if s == 0:
        return out, final.zero_() if init is None else final.copy_(init)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    block_v = _block(dv, 32)
    _scan_fwd_kernel[(b * h, triton.cdiv(dv, block_v))](
        q,
        k,
        v,
        g,
        beta,
        g if seg is None else seg,  # an unused pointer when there is no seq_idx
        final if init is None else init,
        out,
        final,
        s,
        h,
        dk,
        dv,
        dk**-0.5 if scale is None else scale,
        EPS=L2NORM_EPS,
        USE_L2NORM=use_qk_l2norm,
        HAS_INIT=init is not None,
        HAS_SEG=seg is not None,
        CHUNK=chunk_size,
        LOG2_CHUNK=chunk_size.bit_length() - 1,
        BK=_block(dk, 1 << 30),
        BV=block_v,
        num_warps=8 if chunk_size >= 64 else 4,  # a 64-token chunk holds several 64x64 tiles
    )
    return out, final


class _GatedDeltaRuleFunction(torch.autograd.Function):
    """Forward by the Triton scan; backward by recomputing the torch reference.

    The backward re-runs :func:`mcore.ssm.gated_delta.gated_delta_rule` on the saved inputs
    under ``torch.enable_grad()`` and differentiates that: correct gradients without a Triton
    backward, at the cost of the reference's time and memory in the backward pass.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,
        beta: Tensor,
        initial_state: Tensor | None,
        seq_idx: Tensor | None,
        chunk_size: int,
        use_qk_l2norm: bool,
        scale: float | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(q, k, v, g, beta, initial_state, seq_idx)
        ctx.options = {"chunk_size": chunk_size, "use_qk_l2norm": use_qk_l2norm, "scale": scale}
        return _scan_forward(
            q, k, v, g, beta, chunk_size, initial_state, seq_idx, use_qk_l2norm, scale
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_final: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, g, beta, initial_state, seq_idx = ctx.saved_tensors
        inputs = [q, k, v, g, beta, initial_state]
        wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[i]]
        if not wanted:
            return (None,) * 10
        leaves = [
            x if x is None else x.detach().requires_grad_(i in wanted) for i, x in enumerate(inputs)
        ]
        with torch.enable_grad():
            out, final = gated_delta_rule(
                *leaves[:5],
                initial_state=leaves[5],
                seq_idx=seq_idx,
                return_final_state=True,
                **ctx.options,
            )
            # A scalar whose gradients w.r.t. (out, final) are (grad_out, grad_final): passing
            # grad_outputs instead makes autograd import sympy on first use (seconds).
            surrogate = (out * grad_out).sum() + (final * grad_final.to(final.dtype)).sum()
            grads = torch.autograd.grad(surrogate, [leaves[i] for i in wanted], allow_unused=True)
        result: list[Tensor | None] = [None] * 10
        for i, grad in zip(wanted, grads, strict=True):
            result[i] = grad
        return tuple(result)


def gated_delta_rule_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`mcore.ssm.gated_delta.gated_delta_rule` with a Triton forward (fp32 inside).

    ``chunk_size`` must be a power of two, at least 16. The final state is fp32 whatever the
    inputs' dtype. The backward recomputes through the torch reference.
    """
    check_inputs(q, k, v, g, beta, chunk_size, initial_state, seq_idx)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton scan needs a power-of-two chunk_size >= 16, got {chunk_size}")
    _check_can_run("gated_delta_rule_triton", q, k, v, g, beta, initial_state, seq_idx)
    out, final = _GatedDeltaRuleFunction.apply(
        q, k, v, g, beta, initial_state, seq_idx, chunk_size, use_qk_l2norm, scale
    )
    return (out, final) if return_final_state else out


def gated_delta_step_triton(
    state: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> Tensor:
    """:func:`mcore.ssm.gated_delta.gated_delta_step` as one kernel: ``state`` updated in place.

    Not differentiable (decoding). A non-contiguous ``state`` is updated through a copy.
    """
    b, h, dk, dv = state.shape
    if q.shape != (b, h, dk) or k.shape != (b, h, dk) or v.shape != (b, h, dv):
        raise ValueError(
            f"state {tuple(state.shape)} needs q, k [b, h, dk] and v [b, h, dv]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if g.shape != (b, h) or beta.shape != (b, h):
        raise ValueError(f"g and beta must be [b, h], got {tuple(g.shape)}, {tuple(beta.shape)}")
    _check_can_run("gated_delta_step_triton", state, q, k, v, g, beta)
    work = state if state.is_contiguous() else state.contiguous()
    out = torch.empty(b, h, dv, dtype=v.dtype, device=v.device)
    block_v = _block(dv, 64)
    if b * h and dv:
        _step_kernel[(b * h, triton.cdiv(dv, block_v))](
            work,
            *(x.contiguous() for x in (q, k, v, g, beta)),
            out,
            dk,
            dv,
            dk**-0.5 if scale is None else scale,
            EPS=L2NORM_EPS,
            USE_L2NORM=use_qk_l2norm,
            BK=_block(dk, 1 << 30),
            BV=block_v,
        )
    if work is not state:
        state.copy_(work)
    return out
