"""Rotary position embeddings, with the frequency scalings Llama 3 and YaRN use.

Frequencies follow the "rotate half" layout of Llama and of Hugging Face (the first and second
half of each head dimension form the rotated pairs), so weights import without permutation.
"""

from __future__ import annotations

import math

import torch

from mcore.models.config import TransformerConfig


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: TransformerConfig) -> torch.Tensor:
    # Long wavelengths are slowed by the factor, short ones kept, and the band between is blended.
    factor = cfg.rope_scaling_factor
    old_len = cfg.rope_original_max_position_embeddings
    assert old_len is not None, "validated with rope_scaling"
    low_wavelen = old_len / cfg.rope_low_freq_factor
    high_wavelen = old_len / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context extension of ``scale``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, cfg: TransformerConfig) -> tuple[torch.Tensor, float]:
    base, factor = cfg.rotary_base, cfg.rope_scaling_factor
    old_len = cfg.rope_original_max_position_embeddings
    assert old_len is not None, "validated with rope_scaling"

    def correction_dim(rotations: float) -> float:
        # The dimension index whose wavelength fits ``rotations`` times into the old context.
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where frequencies are high enough to keep as trained
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    if cfg.yarn_mscale_all_dim:
        attention_factor = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(
            factor, cfg.yarn_mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(factor, cfg.yarn_mscale)
    return inv_freq, attention_factor


def rope_frequencies(dim: int, cfg: TransformerConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim // 2]`` (fp32) and the factor that scales cos and sin."""
    inv_freq = 1.0 / (
        cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    )
    if cfg.rope_scaling == "none":
        return inv_freq, 1.0
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_scaling_factor, 1.0
    if cfg.rope_scaling == "llama3":
        return _llama3_inv_freq(inv_freq, cfg), 1.0
    return _yarn_inv_freq(dim, cfg)


class RotaryEmbedding(torch.nn.Module):
    """Computes cos and sin tables for the given positions; holds no trainable state."""

    inv_freq: torch.Tensor  # a buffer

    def __init__(self, dim: int, config: TransformerConfig) -> None:
        super().__init__()
        self.dim = dim
        # Computed on the CPU even inside a meta-device build: it is derived, not initialised.
        inv_freq, self.attention_factor = rope_frequencies(dim, config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [b, s] -> cos, sin of shape [b, 1, s, dim] in fp32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [b, s, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos[:, None], sin[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of :class:`RotaryEmbedding` for one row of positions (``[1, 1, T, dim]``)
    laid out for :func:`apply_rotary_rows`: ``cos [T, 1, dim]`` and ``sin`` with the sign of
    its first half flipped, which turns "rotate half" into a roll."""
    cos, sin = cos[0, 0, :, None], sin[0, 0, :, None]
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary_rows(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` for ``x [T, heads, dim]`` over the tables of :func:`rotary_rows`,
    with the same result bit for bit (``-a * b == a * -b``) in a third of the operations."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        rotated = apply_rotary_rows(x[..., :rot], cos, signed_sin)
        return torch.cat([rotated, x[..., rot:]], dim=-1)
    x32 = x.float()
    out = x32 * cos + x32.roll(rot // 2, dims=-1) * signed_sin
    return out.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, heads, s, dim] by the position tables, computing in fp32.

    Tables narrower than ``dim`` (partial rotary, ``rotary_percent < 1``) rotate the leading
    channels of each head and pass the rest through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    out = x.float() * cos + _rotate_half(x.float()) * sin
    return out.to(x.dtype)
