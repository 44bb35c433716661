"""A pre-norm transformer layer assembled from registered modules.

``LayerSpec`` names the attention and MLP; each is looked up in its registry, so a plugin swaps
one by registering a module and naming it in the spec, without subclassing anything.

Which spec each layer gets: with ``hybrid_override_pattern`` one symbol per layer, looked up in
the ``layer`` registry (``*`` attention, ``-`` MLP; mcore-moe adds ``E``, an MoE MLP; mcore-ssm
adds ``M`` and ``G``, whose layers hold a sequence *mixer* from the ``mixer`` registry). Otherwise
a GPT layer (attention and MLP), whose MLP a config section of another package may choose per
layer through a ``mlp_for_layer(layer_number) -> str | None`` method (mcore-moe's ``[moe]``
section picks ``moe`` for its MoE layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from mcore.models.config import TransformerConfig
from mcore.models.context import ModelContext, mark_tp_partial_grad
from mcore.models.inference import PagedBatch
from mcore.models.packing import PackedSeqParams


@dataclass(frozen=True)
class LayerSpec:
    """Registry names of the modules one transformer layer is built from."""

    attention: str | None = "self_attention"
    """``attention`` registry: self_attention (MHA/GQA) or mla; None for an MLP-only layer."""
    mlp: str | None = "mlp"
    """``mlp`` registry: mlp (dense); mcore-moe adds moe. None for an attention-only layer."""
    mixer: str | None = None
    """``mixer`` registry: a sequence mixer in place of attention (mcore-ssm's mamba and
    gated_delta_net). A mixer is built as ``Mixer(ctx, layer_number=...)`` and called as
    ``mixer(x, paged=..., packed_seq_params=...)`` on ``[s, b, h]``; see
    :class:`mcore.models.inference.RecurrentStateSpec` for what it keeps at inference."""

    def __post_init__(self) -> None:
        if self.mixer is not None and self.attention is not None:
            raise ValueError(
                f"LayerSpec(attention={self.attention!r}, mixer={self.mixer!r}): a layer holds "
                "attention or a sequence mixer, not both"
            )


def _attention_name(config: TransformerConfig) -> str:
    return "mla" if config.multi_latent_attention else "self_attention"


def gpt_layer_spec(
    config: TransformerConfig, layer_number: int = 0, sections: Mapping[str, Any] | None = None
) -> LayerSpec:
    """The spec of GPT layer ``layer_number`` (0-based): attention and an MLP, the MLP chosen
    by a section's ``mlp_for_layer`` when one picks it."""
    mlp = "mlp"
    for section in (sections or {}).values():
        choose = getattr(section, "mlp_for_layer", None)
        chosen = choose(layer_number) if callable(choose) else None
        if chosen is not None:
            mlp = cast("str", chosen)
    return LayerSpec(attention=_attention_name(config), mlp=mlp)


def attention_layer_spec(config: TransformerConfig) -> LayerSpec:
    """The ``*`` symbol of a hybrid pattern: an attention-only layer."""
    return LayerSpec(attention=_attention_name(config), mlp=None)


def mlp_layer_spec(config: TransformerConfig) -> LayerSpec:
    """The ``-`` symbol of a hybrid pattern: a dense-MLP-only layer."""
    return LayerSpec(attention=None, mlp="mlp")


def layer_specs(
    config: TransformerConfig,
    layer_numbers: Sequence[int],
    *,
    sections: Mapping[str, Any] | None = None,
    registries: Any = None,
) -> dict[int, LayerSpec]:
    """The spec of each of ``layer_numbers``: from the hybrid pattern when there is one (symbols
    from the ``layer`` registry), else GPT layers."""
    pattern = config.layer_pattern
    if pattern is None:
        return {i: gpt_layer_spec(config, i, sections) for i in layer_numbers}
    if registries is None:
        from mcore.core import get_plugin_manager

        registries = get_plugin_manager().registries
    return {i: registries.get("layer", pattern.layers[i])(config) for i in layer_numbers}


def mtp_layer_specs(
    config: TransformerConfig,
    spec: LayerSpec | None = None,
    *,
    sections: Mapping[str, Any] | None = None,
    registries: Any = None,
) -> list[list[LayerSpec]]:
    """The layers of each multi-token-prediction depth: the symbols of its ``/`` block of the
    hybrid pattern, else one layer with ``spec`` or the spec of the main stack's last layer
    (Megatron's choice; DeepSeek-V3's MTP layer is an MoE layer like its last one)."""
    pattern = config.layer_pattern
    if pattern is not None and pattern.mtp_layers:
        if registries is None:
            from mcore.core import get_plugin_manager

            registries = get_plugin_manager().registries
        return [
            [registries.get("layer", symbol)(config) for symbol in block]
            for block in pattern.mtp_layers
        ]
    if spec is None:
        last = config.num_layers - 1
        spec = layer_specs(config, [last], sections=sections, registries=registries)[last]
    return [[spec] for _ in range(config.mtp_depth)]


class TransformerLayer(torch.nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with dropout on each branch."""

    compile_region = True
    """``train.compile`` compiles each layer on its own (:mod:`mcore.parallel.compile`)."""

    def __init__(self, ctx: ModelContext, spec: LayerSpec, *, layer_number: int) -> None:
        super().__init__()
        cfg = ctx.config
        self.layer_number = layer_number
        self.input_layernorm = self.self_attention = self.mixer = None
        self.pre_mlp_layernorm = self.mlp = None
        if spec.mixer is not None:
            self.input_layernorm = ctx.norm(cfg.hidden_size)
            self.mixer = ctx.build("mixer", spec.mixer, ctx, layer_number=layer_number)
        if spec.attention is not None:
            self.input_layernorm = ctx.norm(cfg.hidden_size)
            self.self_attention = ctx.build(
                "attention", spec.attention, ctx, layer_number=layer_number
            )
        if spec.mlp is not None:
            self.pre_mlp_layernorm = ctx.norm(cfg.hidden_size)
            self.mlp = ctx.build("mlp", spec.mlp, ctx, layer_number=layer_number)
        self.dropout = cfg.hidden_dropout
        if ctx.sequence_parallel:
            # Norms see only this rank's sequence shard: their gradients are partial over TP.
            norms = [n for n in (self.input_layernorm, self.pre_mlp_layernorm) if n is not None]
            mark_tp_partial_grad(*(p for n in norms for p in n.parameters()))

    def forward(
        self,
        x: torch.Tensor,
        rotary=None,
        paged: PagedBatch | None = None,
        attn_mask: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """``paged``: at inference, the engine's batch over the paged KV cache (see
        ``mcore.models.inference``); ``x`` is then the flat token row ``[T, 1, h]``.
        ``attn_mask``: packed sequences' block-diagonal causal mask (``mcore.models.packing``);
        ``packed_seq_params``: the same packing, for a sequence mixer."""
        if self.mixer is not None:
            assert self.input_layernorm is not None  # built with the mixer
            h = self.mixer(
                self.input_layernorm(x), paged=paged, packed_seq_params=packed_seq_params
            )
            x = x + F.dropout(h, self.dropout, self.training)
        if self.self_attention is not None:
            assert self.input_layernorm is not None  # built with the attention
            normed = self.input_layernorm(x)
            if paged is not None:
                h = self.self_attention(normed, rotary, paged=paged)
            elif attn_mask is not None:
                h = self.self_attention(normed, rotary, attn_mask=attn_mask)
            else:
                h = self.self_attention(normed, rotary)
            x = x + F.dropout(h, self.dropout, self.training)
        if self.mlp is not None:
            assert self.pre_mlp_layernorm is not None  # built with the MLP
            h = self.mlp(self.pre_mlp_layernorm(x))
            x = x + F.dropout(h, self.dropout, self.training)
        return x
