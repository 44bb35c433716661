"""Core attention kernels, registered under ``attention_backend``.

A backend maps ``q [b, hq, s, d]``, ``k, v [b, hkv, s, d]`` to ``[b, hq, s, dv]`` with causal
masking, or, for packed sequences, with the boolean ``attn_mask [b, 1, s, s]`` of
:mod:`mcore.models.packing`. With context parallelism the sequence dim holds this rank's
load-balanced shard and the backend is handed the CP group.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from mcore.parallel import context_parallel_attention

log = logging.getLogger(__name__)


def _group_size(group: Any) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


class SDPAAttention:
    """torch's scaled_dot_product_attention (flash / memory-efficient kernels where available)."""

    name = "sdpa"

    def __init__(self, *, dropout: float = 0.0) -> None:
        self.dropout = dropout

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        softmax_scale: float,
        cp_group: Any = None,
        training: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if _group_size(cp_group) > 1:
            if attn_mask is not None:
                raise NotImplementedError(
                    "packed sequences under context parallelism are not supported: pack with "
                    "parallel.context_parallel_size = 1"
                )
            return context_parallel_attention(
                q, k, v, cp_group=cp_group, causal=True, softmax_scale=softmax_scale
            )
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,  # packed sequences: causal within each one (see packing.py)
            is_causal=attn_mask is None,
            scale=softmax_scale,
            dropout_p=self.dropout if training else 0.0,
            enable_gqa=q.shape[1] != k.shape[1],
        )


class TEAttention:
    """Transformer Engine's fused attention (cuDNN / flash kernels); GPUs only."""

    name = "te"

    def __init__(self, *, dropout: float = 0.0) -> None:
        # Fails here when Transformer Engine (the optional `te` extra) is absent.
        import transformer_engine.pytorch as te  # noqa: F401  # pyright: ignore[reportMissingImports]

        self.dropout = dropout
        self._modules: dict[tuple, Any] = {}

    def __call__(self, q, k, v, *, softmax_scale, cp_group=None, training=False, attn_mask=None):
        import transformer_engine.pytorch as te  # pyright: ignore[reportMissingImports]

        if attn_mask is not None:
            raise NotImplementedError(
                "packed sequences with attention_backend 'te' are not supported yet; use "
                "model.attention_backend = 'sdpa' for packed batches"
            )
        key = (q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], softmax_scale)
        if key not in self._modules:
            self._modules[key] = te.DotProductAttention(
                num_attention_heads=q.shape[1],
                kv_channels=(q.shape[-1], v.shape[-1]),
                num_gqa_groups=k.shape[1],
                attention_dropout=self.dropout,
                attn_mask_type="causal",
                qkv_format="bshd",
                softmax_scale=softmax_scale,
            )
        module = self._modules[key]
        if _group_size(cp_group) > 1:
            # TE's own CP uses the same load-balanced split (chunks r and 2cp-1-r).
            ranks = torch.distributed.get_process_group_ranks(cp_group)
            module.set_context_parallel_group(cp_group, ranks, torch.cuda.Stream(), "all_gather")
        b, hq, s, _ = q.shape
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # TE's bshd layout
        out = module(q, k, v)  # [b, s, hq * dv]
        return out.reshape(b, s, hq, -1).transpose(1, 2)


_warned: set[str] = set()


def resolve_backend(registry: Any, name: str, **kwargs: Any) -> Any:
    """Instantiate attention backend ``name``; ``te`` without Transformer Engine falls back to
    ``sdpa`` with one log line, as the extra is optional."""
    if name == "te":
        try:
            return registry.get("te")(**kwargs)
        except Exception as exc:  # not installed, or installed without a usable CUDA build
            if "te" not in _warned:
                _warned.add("te")
                log.warning(
                    "attention_backend 'te' is unavailable here (%s); using 'sdpa'. "
                    "Install 'mcore-models[te]' on a CUDA machine for Transformer Engine.",
                    exc,
                )
            name = "sdpa"
    return registry.get(name)(**kwargs)
