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

    Follows ``model.hybrid_override_pattern`` (``*`` attention, ``-`` MLP, ``E`` MoE; sequence
    mixers such as ``M`` and ``G`` have neither: :func:`mixer_flops` counts them) or else GPT
    layers, MoE where ``[moe]`` says."""
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


def mixer_flops(model: Any, ssm: Any, symbol: str | None, seq_length: int) -> float:
    """Forward FLOPs per token of a sequence-mixer layer: ``M`` (Mamba-2) or ``G`` (gated delta
    net) sized by the ``[ssm]`` section; other symbols have none.

    Projections and the depthwise conv exactly; the chunked scan as its per-token state work
    (the chunk-state update and the output read from the state, each ``heads x state`` MACs)
    plus the quadratic term within a chunk (``chunk x (key + value width)`` per head).
    """
    if ssm is None or symbol not in ("M", "G"):
        return 0.0
    h = model.hidden_size
    if symbol == "M":
        heads = ssm.mamba_heads(h)
        p, n, g = ssm.mamba_head_dim, ssm.mamba_state_dim, ssm.mamba_num_groups
        inner, bc = heads * p, 2 * g * n
        proj = h * (2 * inner + bc + heads) + inner * h
        conv = ssm.mamba_conv_kernel * (inner + bc)
        chunk = min(ssm.mamba_chunk_size, seq_length)
        scan = 2 * heads * p * n + heads * chunk * (n + p)
    else:
        nk, nv = ssm.linear_num_key_heads, ssm.linear_num_value_heads
        dk, dv = ssm.linear_key_head_dim, ssm.linear_value_head_dim
        proj = h * (2 * nk * dk + 2 * nv * dv + 2 * nv) + nv * dv * h
        conv = ssm.linear_conv_kernel_dim * (2 * nk * dk + nv * dv)
        chunk = min(ssm.linear_chunk_size, seq_length)
        scan = 3 * nv * dk * dv + nv * chunk * (dk + dv)
    return 2.0 * (proj + conv + scan)


def layer_flops(model: Any, moe: Any, seq_length: int, ssm: Any = None) -> list[float]:
    """Training FLOPs per token of each layer (3 x forward); ``ssm`` sizes ``M``/``G`` layers."""
    attention = attention_flops(model, seq_length)
    parsed = getattr(model, "layer_pattern", None)
    symbols = parsed.layers if parsed is not None else [None] * model.num_layers
    return [
        3.0
        * (
            (attention if has_attention else 0.0)
            + mlp_flops(model, moe, kind)
            + mixer_flops(model, ssm, symbol, seq_length)
        )
        for (has_attention, kind), symbol in zip(layer_kinds(model, moe), symbols, strict=True)
    ]


def head_flops(model: Any) -> float:
    """Training FLOPs per token of the output layer (3 x forward)."""
    return 3.0 * 2.0 * model.hidden_size * model.vocab_size


def mtp_blocks(model: Any, moe: Any) -> list[list[tuple[tuple[bool, str | None], str | None]]]:
    """Per multi-token-prediction depth, its layers as ``((has attention, mlp kind), symbol)``:
    the depth's ``/`` block of the pattern, else one layer like the last main one."""
    depth = getattr(model, "mtp_depth", 0)
    if not depth:
        return []
    parsed = getattr(model, "layer_pattern", None)
    if parsed is not None and parsed.mtp_layers:
        table = {"*": (True, None), "-": (False, "dense"), "E": (False, "moe")}
        return [[(table.get(c, (False, None)), c) for c in block] for block in parsed.mtp_layers]
    kinds = layer_kinds(model, moe)
    symbol = parsed.layers[-1] if parsed is not None else None
    return [[(kinds[-1], symbol)] for _ in range(depth)]


def mtp_flops(model: Any, moe: Any, seq_length: int, ssm: Any = None) -> float:
    """Training FLOPs per token of the multi-token-prediction depths (on the last stage): each
    depth's 2h x h projection, its layers and its pass through the output layer."""
    h = model.hidden_size
    attention = attention_flops(model, seq_length)
    total = 0.0
    for block in mtp_blocks(model, moe):
        forward = 2.0 * 2 * h * h + 2.0 * h * model.vocab_size
        for (has_attention, kind), symbol in block:
            forward += attention if has_attention else 0.0
            forward += mlp_flops(model, moe, kind) + mixer_flops(model, ssm, symbol, seq_length)
        total += 3.0 * forward
    return total


def model_flops_per_token(model: Any, moe: Any, seq_length: int, ssm: Any = None) -> float:
    """Training model FLOPs per token of the whole model, MTP depths included."""
    layers = sum(layer_flops(model, moe, seq_length, ssm))
    return layers + head_flops(model) + mtp_flops(model, moe, seq_length, ssm)
