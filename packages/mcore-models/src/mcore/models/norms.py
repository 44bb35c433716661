"""Normalisation layers, registered under the ``norm`` kind by name."""

from __future__ import annotations

import torch

from mcore.parallel.init import ONES, ZEROS, set_init


class RMSNorm(torch.nn.Module):
    """Root-mean-square normalisation, computed in fp32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = set_init(torch.nn.Parameter(torch.ones(hidden_size)), ONES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the ``(hidden_size, eps)`` signature every norm here shares."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        set_init(self.weight, ONES)
        set_init(self.bias, ZEROS)
