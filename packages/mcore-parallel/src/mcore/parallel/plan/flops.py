"""Model FLOPs per token, layer by layer: dense, grouped-query and multi-latent attention, dense
and MoE MLPs (only the experts a token is routed to, plus shared experts and the router).

The conventions of ``mcore.core.training.flops``: a multiply-add is two FLOPs, training is three
forward passes, attention scores and values are counted over the full ``s x s`` matrix, and
recompute is not counted (these are model FLOPs, for MFU).
"""

from __future__ import annotations

from typing import Any


def layer_kinds(model: Any, moe: Any) -> list[tuple[bool, str | None]]:
    """``(has attention, mlp kind)`` per layer; the MLP kind is ``"dense"``, ``"moe"`` or None.

    Follows ``model.hybrid_override_pattern`` (``*`` attention, ``-`` MLP, ``E`` MoE; other
    symbols are counted as no matmul work) or else GPT layers, MoE where ``[moe]`` says."""
    parsed = getattr(model, "layer_pattern", None)  # separators removed
    if parsed is not None:
        pattern = parsed.layers
        table = {"*": (True, None), "-": (False, "dense"), "E": (False, "moe")}
        return [table.get(symbol, (False, None)) for symbol in pattern]
    kinds = []
    for i in range(model.num_layers):
        is_moe = moe is not None and moe.num_experts is not None and moe.is_moe_layer(i)
        kinds.append((True, "moe" if is_moe else "dense"))
    return kinds


def attention_flops(model: Any, seq_length: int) -> float:
    """Forward FLOPs per token of one attention layer (projections and core attention)."""
    h, heads = model.hidden_size, model.num_attention_heads
    if model.multi_latent_attention:
        qk, rope, v = model.qk_head_dim, model.qk_pos_emb_head_dim, model.v_head_dim
        q_out = heads * (qk + rope)
        q = h * model.q_lora_rank + model.q_lora_rank * q_out if model.q_lora_rank else h * q_out
        kv = h * (model.kv_lora_rank + rope) + model.kv_lora_rank * heads * (qk + v)
        proj = q + kv + heads * v * h
        core = seq_length * heads * ((qk + rope) + v)
    else:
        d, groups = model.head_dim, model.query_groups
        proj = h * heads * d + 2 * h * groups * d + heads * d * h
        core = 2 * seq_length * heads * d
    return 2.0 * (proj + core)


def mlp_flops(model: Any, moe: Any, kind: str | None) -> float:
    """Forward FLOPs per token of one MLP: dense, or MoE (top-k experts, shared, router)."""
    h = model.hidden_size
    mats = 3 if model.gated_mlp else 2
    if kind == "dense":
        return 2.0 * mats * h * model.ffn_size
    if kind == "moe":
        expert = moe.ffn_hidden_size or model.ffn_size
        shared = moe.shared_expert_intermediate_size or 0
        return 2.0 * (mats * h * (moe.router_topk * expert + shared) + h * moe.num_experts)
    return 0.0


def layer_flops(model: Any, moe: Any, seq_length: int) -> list[float]:
    """Training FLOPs per token of each layer (3 x forward)."""
    attention = attention_flops(model, seq_length)
    return [
        3.0 * ((attention if has_attention else 0.0) + mlp_flops(model, moe, kind))
        for has_attention, kind in layer_kinds(model, moe)
    ]


def head_flops(model: Any) -> float:
    """Training FLOPs per token of the output layer (3 x forward)."""
    return 3.0 * 2.0 * model.hidden_size * model.vocab_size


def model_flops_per_token(model: Any, moe: Any, seq_length: int) -> float:
    """Training model FLOPs per token of the whole model."""
    return sum(layer_flops(model, moe, seq_length)) + head_flops(model)
