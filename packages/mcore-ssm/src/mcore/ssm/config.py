"""The ``[ssm]`` config section: sizes of the Mamba-2 (``M``) and gated-delta-net (``G``) layers.

Field names follow Megatron-Core's (``mamba_state_dim``, ``mamba_head_dim``,
``mamba_num_groups``, ``linear_key_head_dim``, ...), so ``--ssm.mamba-state-dim`` is Megatron's
``--mamba-state-dim``. Which layers are ``M`` or ``G`` is the model's
``hybrid_override_pattern``; this section only sizes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class SSMConfig:
    """Mamba-2 and gated-delta-net layer sizes, and which scan implementation runs them."""

    mamba_state_dim: int = field(default=128, metadata={"megatron": "--mamba-state-dim"})
    """Mamba-2 SSM state size per head (N)."""
    mamba_head_dim: int = field(default=64, metadata={"megatron": "--mamba-head-dim"})
    """Mamba-2 channels per head (P)."""
    mamba_num_groups: int = field(default=8, metadata={"megatron": "--mamba-num-groups"})
    """Mamba-2 groups sharing B and C (G); heads split evenly over them. Must divide over TP."""
    mamba_num_heads: int | None = field(default=None, metadata={"megatron": "--mamba-num-heads"})
    """Mamba-2 heads (H); unset means mamba_expand * hidden_size / mamba_head_dim."""
    mamba_expand: int = 2
    """Mamba-2 inner width as a multiple of hidden_size, when mamba_num_heads is unset."""
    mamba_conv_kernel: int = 4
    """Width of the causal depthwise convolution before the scan (Megatron's d_conv)."""
    mamba_conv_bias: bool = True
    """Bias in the convolution."""
    mamba_proj_bias: bool = False
    """Bias in the input and output projections."""
    mamba_chunk_size: int = 128
    """Chunk length of the chunked SSD scan (memory/speed trade-off; the result is the same)."""
    mamba_dt_min: float = 0.001
    """Smallest initial time step: dt_bias (of the Mamba and the gated-delta-net layers) is drawn
    so that softplus(dt_bias) is log-uniform in [dt_min, dt_max]."""
    mamba_dt_max: float = 0.1
    """Largest initial time step."""
    mamba_dt_init_floor: float = 1e-4
    """Floor of the initial time steps."""
    mamba_dt_limit_min: float = 0.0
    """Time steps are clamped to at least this after the softplus (Nemotron-H: dt_min)."""
    mamba_dt_limit_max: float = math.inf
    """Time steps are clamped to at most this after the softplus."""
    linear_conv_kernel_dim: int = 4
    """Gated delta net: width of the causal convolution over q, k, v."""
    linear_key_head_dim: int = 128
    """Gated delta net: query/key width per head."""
    linear_value_head_dim: int = 128
    """Gated delta net: value width per head."""
    linear_num_key_heads: int = 16
    """Gated delta net: query/key heads. Must divide over TP."""
    linear_num_value_heads: int = 32
    """Gated delta net: value heads, a multiple of linear_num_key_heads (query/key heads are
    shared by consecutive value heads)."""
    linear_chunk_size: int = 64
    """Chunk length of the chunked gated-delta-rule scan."""
    ssm_kernel: Literal["torch", "triton"] = "torch"
    """Scan implementation: torch (the chunked reference, any device) or triton (the kernels of
    mcore-ssm[triton]; CUDA, or CPU under TRITON_INTERPRET=1)."""

    def mamba_heads(self, hidden_size: int) -> int:
        """Mamba-2 heads of a model of width ``hidden_size``."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return self.mamba_expand * hidden_size // self.mamba_head_dim

    def validate(self, errors: ConfigErrors) -> None:
        for name in (
            "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_expand",
            "mamba_conv_kernel", "mamba_chunk_size", "linear_conv_kernel_dim",
            "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
            "linear_num_value_heads", "linear_chunk_size",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                errors.add(name, f"must be >= 1, got {getattr(self, name)}")
        if self.mamba_num_heads is not None:
            if self.mamba_num_heads < 1:
                errors.add("mamba_num_heads", f"must be >= 1, got {self.mamba_num_heads}")
            elif self.mamba_num_groups >= 1 and self.mamba_num_heads % self.mamba_num_groups:
                errors.add(
                    "mamba_num_heads",
                    f"{self.mamba_num_heads} heads do not split over mamba_num_groups "
                    f"({self.mamba_num_groups})",
                )
        if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
            errors.add("mamba_dt_min", "needs 0 < mamba_dt_min <= mamba_dt_max")
        if self.mamba_dt_limit_min > self.mamba_dt_limit_max:
            errors.add("mamba_dt_limit_min", "must not exceed mamba_dt_limit_max")
        keys, values = self.linear_num_key_heads, self.linear_num_value_heads
        if keys >= 1 and values % keys:
            errors.add(
                "linear_num_value_heads",
                f"{values} value heads are not a multiple of linear_num_key_heads ({keys})",
            )
