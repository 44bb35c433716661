"""Normalisation layers, registered under the ``norm`` kind by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcore.parallel.init import ONES, ZEROS, set_init


class RMSNorm(torch.nn.Module):
    """Root-mean-square normalisation, computed in fp32 whatever the input dtype.

    ``zero_centered_gamma``: the weight holds ``gamma - 1`` (zeros at init) and the scale is
    ``1 + weight``, applied in fp32 (Qwen3-Next's norms)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        init = ZEROS if zero_centered_gamma else ONES
        self.weight = set_init(torch.nn.Parameter(torch.empty(hidden_size)), init)
        if not self.weight.is_meta:
            init.fill(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered_gamma:
            normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op, same values
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the ``(hidden_size, eps)`` signature every norm here shares."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, zero_centered_gamma: bool = False):
        super().__init__(hidden_size, eps=eps)
        self.zero_centered_gamma = zero_centered_gamma
        set_init(self.weight, ZEROS if zero_centered_gamma else ONES)
        set_init(self.bias, ZEROS)
        if zero_centered_gamma and not self.weight.is_meta:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered_gamma:
            return super().forward(x)
        return torch.nn.functional.layer_norm(
            x, self.normalized_shape, 1.0 + self.weight, self.bias, self.eps
        )
