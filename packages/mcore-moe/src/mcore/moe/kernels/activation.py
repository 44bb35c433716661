"""Triton kernels for the experts' weighted activations, with Triton backwards.

One program per row: the weight's gradient is a sum over the whole row, so looping over the
feature dim inside the program makes it a plain reduction instead of atomics across programs.
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
def _weighted_squared_relu_fwd_kernel(x_ptr, weights_ptr, out_ptr, features, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    weight = tl.load(weights_ptr + n).to(tl.float32)
    for f0 in range(0, features, BLOCK):
        offs = f0 + tl.arange(0, BLOCK)
        mask = offs < features
        x = tl.load(x_ptr + n * features + offs, mask=mask, other=0.0).to(tl.float32)
        relu = tl.maximum(x, 0.0)
        tl.store(
            out_ptr + n * features + offs,
            (relu * relu * weight).to(out_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _weighted_squared_relu_bwd_kernel(
    grad_out_ptr,
    x_ptr,
    weights_ptr,
    grad_x_ptr,
    grad_weights_ptr,
    features,
    BLOCK: tl.constexpr,
):
    # d/dx = 2 relu(x) w g; d/dw = sum over the row of relu(x)^2 g.
    n = tl.program_id(0).to(tl.int64)
    weight = tl.load(weights_ptr + n).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for f0 in range(0, features, BLOCK):
        offs = f0 + tl.arange(0, BLOCK)
        mask = offs < features
        x = tl.load(x_ptr + n * features + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_out_ptr + n * features + offs, mask=mask, other=0.0).to(tl.float32)
        relu = tl.maximum(x, 0.0)
        tl.store(
            grad_x_ptr + n * features + offs,
            (2.0 * relu * weight * grad).to(grad_x_ptr.dtype.element_ty),
            mask=mask,
        )
        acc += relu * relu * grad
    tl.store(grad_weights_ptr + n, tl.sum(acc).to(grad_weights_ptr.dtype.element_ty))


INTERPRETED = is_interpreted(_weighted_squared_relu_fwd_kernel)
"""Whether these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


class WeightedSquaredReluFunction(torch.autograd.Function):
    """``relu(x)**2 * weights[:, None]`` for ``x`` ``[N, F]`` and ``weights`` ``[N]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x, weights = x.contiguous(), weights.contiguous()
        out = torch.empty_like(x)
        rows, features = x.shape
        if rows and features:
            _weighted_squared_relu_fwd_kernel[(rows,)](
                x, weights, out, features, BLOCK=block_size(features)
            )
        ctx.save_for_backward(x, weights)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weights = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        # Zeros, not empty: with no features there is no row to sum and the gradient is 0.
        grad_weights = torch.zeros_like(weights)
        rows, features = x.shape
        if rows and features:
            _weighted_squared_relu_bwd_kernel[(rows,)](
                grad_out.contiguous(),
                x,
                weights,
                grad_x,
                grad_weights,
                features,
                BLOCK=block_size(features),
            )
        return grad_x, grad_weights
