"""A pre-norm transformer layer assembled from registered modules.

``LayerSpec`` names the norm, attention and MLP; each is looked up in its registry, so a plugin
swaps one by registering a module and naming it in the spec, without subclassing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mcore.models.config import TransformerConfig
from mcore.models.context import ModelContext, mark_tp_partial_grad


@dataclass(frozen=True)
class LayerSpec:
    """Registry names of the modules one transformer layer is built from."""

    attention: str = "self_attention"
    """``attention`` registry: self_attention (MHA/GQA) or mla."""
    mlp: str = "mlp"
    """``mlp`` registry: mlp (dense); mcore-moe adds moe."""


def gpt_layer_spec(config: TransformerConfig) -> LayerSpec:
    """The spec of a GPT layer for ``config``."""
    return LayerSpec(attention="mla" if config.multi_latent_attention else "self_attention")


class TransformerLayer(torch.nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with dropout on each branch."""

    def __init__(self, ctx: ModelContext, spec: LayerSpec, *, layer_number: int) -> None:
        super().__init__()
        cfg = ctx.config
        self.layer_number = layer_number
        self.input_layernorm = ctx.norm(cfg.hidden_size)
        self.self_attention = ctx.build("attention", spec.attention, ctx, layer_number=layer_number)
        self.pre_mlp_layernorm = ctx.norm(cfg.hidden_size)
        self.mlp = ctx.build("mlp", spec.mlp, ctx)
        self.dropout = cfg.hidden_dropout
        if ctx.sequence_parallel:
            # Norms see only this rank's sequence shard: their gradients are partial over TP.
            mark_tp_partial_grad(
                *self.input_layernorm.parameters(), *self.pre_mlp_layernorm.parameters()
            )

    def forward(self, x: torch.Tensor, rotary=None) -> torch.Tensor:
        h = self.self_attention(self.input_layernorm(x), rotary)
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.mlp(self.pre_mlp_layernorm(x))
        return x + F.dropout(h, self.dropout, self.training)
