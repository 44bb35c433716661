"""Expert activations that multiply in each row's routing probability.

For experts that apply the probability themselves instead of leaving it to ``unpermute``;
fusing it into the activation saves a pass over the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mcore.moe import kernels


def weighted_squared_relu(x: Tensor, weights: Tensor, *, fused: bool = False) -> Tensor:
    """``relu(x)**2 * weights[..., None]``: squared ReLU scaled per row by its routing weight.

    ``x`` ``[..., F]``, ``weights`` ``x.shape[:-1]``. The torch path computes in ``x``'s dtype
    (``weights`` cast to it); the fused Triton path computes in fp32 and rounds once to ``x``'s
    dtype. Differentiable w.r.t. both.
    """
    _check_weights("weighted_squared_relu", x, weights, x.shape[:-1])
    if fused:
        module = kernels.load("activation", "weighted_squared_relu", x, weights)
        rows = x.reshape(-1, x.shape[-1])
        out = module.WeightedSquaredReluFunction.apply(rows, weights.reshape(-1))
        return out.view(x.shape)
    return torch.relu(x).square() * weights.to(x.dtype).unsqueeze(-1)


def weighted_swiglu(x: Tensor, weights: Tensor, *, fused: bool = False) -> Tensor:
    """``silu(gate) * up * weights[..., None]`` with ``x = [gate | up]`` along the last dim.

    Torch only: ``fused=True`` raises, as there is no kernel for it yet.
    """
    _check_weights("weighted_swiglu", x, weights, x.shape[:-1])
    if x.shape[-1] % 2:
        raise ValueError(
            f"weighted_swiglu: the last dim of x holds [gate | up] and must be even; got "
            f"{x.shape[-1]}"
        )
    if fused:
        raise RuntimeError("weighted_swiglu has no fused kernel yet; pass fused=False")
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up * weights.to(x.dtype).unsqueeze(-1)


def _check_weights(what: str, x: Tensor, weights: Tensor, expected: torch.Size) -> None:
    if weights.shape != expected:
        raise ValueError(
            f"{what}: weights must have shape x.shape[:-1] = {tuple(expected)}; got "
            f"{tuple(weights.shape)} (squeeze a trailing 1)"
        )
