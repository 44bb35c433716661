"""Hugging Face MoE architectures: Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3.

Each is an :class:`~mcore.models.hf.architectures.HFArchitecture` whose config.json becomes a
``TransformerConfig`` plus a ``[moe]`` :class:`MoEConfig`, and whose weights map onto the MoE
layer's ``router``, stacked ``experts`` and ``shared_experts``. transformers 5 keeps experts
fused in memory, but its files name them one by one (``mlp.experts.{e}.gate_proj.weight``),
which is what these maps read and write.

DeepSeek-V3's multi-token-prediction depths (``num_nextn_predict_layers``) are stored as extra
decoder layers after the main ones: depth ``k`` is ``model.layers.{num_hidden_layers + k}``,
holding an MoE decoder layer plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``.
"""

from __future__ import annotations

from typing import Any

from mcore.core import ConfigError, ConfigErrors
from mcore.models.config import TransformerConfig
from mcore.models.hf import mtp_block_params, mtp_depth_params
from mcore.models.hf.architectures import (
    Deinterleave,
    HFArchitecture,
    ParamMap,
    Sections,
    attention_params,
    gated_mlp_params,
    layer_norm_params,
    llama_like_config,
    llama_like_hf,
    outer_params,
    rope_from_hf,
    rope_to_hf,
)
from mcore.moe.config import MoEConfig

__all__ = ["DEEPSEEK_V3", "MIXTRAL", "QWEN2_MOE", "QWEN3_MOE"]


def _checked(moe: MoEConfig) -> MoEConfig:
    errors = ConfigErrors("moe.")
    moe.validate(errors)
    if errors:
        raise ConfigError(errors.messages)
    return moe


def _moe_section(sections: Sections, arch: str) -> MoEConfig:
    moe = (sections or {}).get("moe")
    if moe is None or moe.num_experts is None:
        raise NotImplementedError(
            f"{arch} is a mixture of experts: the model needs a [moe] section with num_experts"
        )
    return moe


def moe_layers(cfg: TransformerConfig, moe: MoEConfig) -> tuple[int, ...]:
    """The layers whose MLP is an MoE layer."""
    return tuple(i for i in range(cfg.num_layers) if moe.is_moe_layer(i))


def dense_layers(cfg: TransformerConfig, moe: MoEConfig) -> tuple[int, ...]:
    """The layers that keep a dense MLP."""
    return tuple(i for i in range(cfg.num_layers) if not moe.is_moe_layer(i))


def _softmax_renormalised(moe: MoEConfig) -> bool:
    """Whether softmax routing gives the chosen experts weights summing to one: softmax over the
    top-k logits equals softmax over all experts renormalised over the top k."""
    return not moe.router_pre_softmax or moe.router_norm_topk_prob


def _refuse_unless(checks: dict[str, bool], arch: str) -> None:
    """Raise naming every mcore setting ``arch`` cannot express (those mapped to False)."""
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        raise NotImplementedError(f"{arch} cannot express: {'; '.join(bad)}")


def moe_params(
    moe: MoEConfig,
    layers: tuple[int, ...] | None,
    hf: str,
    *,
    router: str = "gate",
    experts: tuple[str | None, str, str] = ("gate_proj", "up_proj", "down_proj"),
    expert_bias: str | None = None,
    shared: str | None = None,
    shared_gate: str | None = None,
) -> list[ParamMap]:
    """The MoE layer's weights in ``layers`` (None: every layer the maps are used for), from HF
    module ``hf`` (``{i}`` for the layer).

    ``router`` names the router module; ``experts`` the gate, up and down projections of
    ``{hf}.experts.{e}`` (a ``None`` gate: non-gated experts and shared expert, e.g.
    Nemotron-H's relu2); ``expert_bias`` the router's score bias, ``shared`` the shared expert
    MLP and ``shared_gate`` its gate (all relative to ``hf``; None where HF has none).
    """
    gate, up, down = experts
    fc1 = (up,) if gate is None else (gate, up)
    e = f"{hf}.experts.{{e}}"
    mcore = "layers.{i}.mlp"
    params = [
        ParamMap(f"{mcore}.router.weight", (f"{hf}.{router}.weight",), "replicated", layers=layers),
        ParamMap(
            f"{mcore}.experts.linear_fc1.weight",
            tuple(f"{e}.{name}.weight" for name in fc1),
            "column",
            layers=layers,
            experts=moe.num_experts,
            group="etp",
        ),
        ParamMap(
            f"{mcore}.experts.linear_fc2.weight",
            (f"{e}.{down}.weight",),
            "row",
            layers=layers,
            experts=moe.num_experts,
            group="etp",
        ),
    ]
    if moe.router_enable_expert_bias:
        if expert_bias is None:
            raise NotImplementedError("this architecture has no router expert bias")
        params.append(
            ParamMap(
                f"{mcore}.router.expert_bias", (f"{hf}.{expert_bias}",), "replicated", layers=layers
            )
        )
    if moe.shared_expert_intermediate_size is not None:
        if shared is None:
            raise NotImplementedError("this architecture has no shared experts")
        params += gated_mlp_params(
            f"{mcore}.shared_experts", f"{hf}.{shared}", names=experts, layers=layers
        )
    if moe.shared_expert_gate:
        if shared_gate is None:
            raise NotImplementedError("this architecture has no shared expert gate")
        params.append(
            ParamMap(
                f"{mcore}.shared_experts.gate_weight",
                (f"{hf}.{shared_gate}.weight",),
                "replicated",
                layers=layers,
            )
        )
    return params


def _require_silu(hf: dict[str, Any]) -> None:
    # The expert maps fuse gate and up projections: the experts must be gated (SwiGLU).
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act {act!r} is not supported for MoE experts")


# Fields a config.json may leave out take transformers' defaults (its config classes'), so a
# hand-written file means what it means to transformers.
_MIXTRAL_DEFAULTS = {
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
}
_QWEN2_MOE_DEFAULTS = {
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "qkv_bias": True,
}
_QWEN3_MOE_DEFAULTS = {
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
}
_DEEPSEEK_V3_DEFAULTS = {
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_interleave": True,
}


# --- Mixtral ----------------------------------------------------------------------------------


def _mixtral_config(hf: dict[str, Any]) -> TransformerConfig:
    hf = {**_MIXTRAL_DEFAULTS, **hf}
    if hf.get("sliding_window") is not None:
        raise NotImplementedError("sliding_window (sliding-window attention) is not supported")
    _require_silu(hf)
    return llama_like_config(hf, qkv_bias=False, qk_norm=False)


def _mixtral_sections(hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**_MIXTRAL_DEFAULTS, **hf}
    # Mixtral: softmax over all experts, top-k, renormalised = softmax over the top-k logits.
    moe = MoEConfig(
        num_experts=hf["num_local_experts"],
        ffn_hidden_size=hf["intermediate_size"],
        router_topk=hf["num_experts_per_tok"],
        router_score_function="softmax",
        router_pre_softmax=False,
    )
    return {"moe": _checked(moe)}


def _mixtral_hf(cfg: TransformerConfig, sections: Sections) -> dict[str, Any]:
    name = MIXTRAL.name
    moe = _moe_section(sections, name)
    _refuse_unless(
        {
            "qkv or linear biases": not (cfg.add_qkv_bias or cfg.add_bias_linear),
            "qk_layernorm": not cfg.qk_layernorm,
            "dense layers (moe.first_k_dense, moe.layer_freq)": not dense_layers(cfg, moe),
            "shared experts": moe.shared_expert_intermediate_size is None,
            "scores other than renormalised softmax": moe.router_score_function == "softmax"
            and _softmax_renormalised(moe),
            "group-limited routing": moe.router_num_groups is None,
            "router_topk_scaling_factor": moe.router_topk_scaling_factor in (None, 1.0),
            "router_enable_expert_bias": not moe.router_enable_expert_bias,
        },
        name,
    )
    out = llama_like_hf(cfg, MIXTRAL.model_type, name)
    out.update(
        intermediate_size=moe.ffn_hidden_size or cfg.ffn_size,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.router_topk,
        sliding_window=None,
    )
    return out


def _mixtral_params(cfg: TransformerConfig, sections: Sections) -> list[ParamMap]:
    moe = _moe_section(sections, MIXTRAL.name)
    return [
        *outer_params(cfg),
        *layer_norm_params(),
        *attention_params(cfg),
        *moe_params(
            moe,
            moe_layers(cfg, moe),
            "model.layers.{i}.block_sparse_moe",
            experts=("w1", "w3", "w2"),
        ),
    ]


MIXTRAL = HFArchitecture(
    "MixtralForCausalLM",
    "mixtral",
    to_config=_mixtral_config,
    from_config=_mixtral_hf,
    params=_mixtral_params,
    sections_from_hf=_mixtral_sections,
)


# --- Qwen2-MoE and Qwen3-MoE ------------------------------------------------------------------


def _sparse_layer_pattern(hf: dict[str, Any]) -> tuple[int, int]:
    """``(first_k_dense, layer_freq)`` giving the MoE layers of a Qwen-MoE config.json.

    transformers makes layer ``i`` sparse when ``(i + 1) % decoder_sparse_step == 0`` and ``i``
    is not in ``mlp_only_layers``; mcore when ``i >= first_k_dense`` and ``(i - first_k_dense)
    % layer_freq == 0``. Any set of that second shape is accepted, others are refused.
    """
    layers = hf["num_hidden_layers"]
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    sparse = [i for i in range(layers) if (i + 1) % step == 0 and i not in dense_only]
    if not sparse:
        return layers, 1
    first = sparse[0]
    freq = sparse[1] - sparse[0] if len(sparse) > 1 else max(1, layers - first)
    if sparse != list(range(first, layers, freq)):
        raise NotImplementedError(
            f"mlp_only_layers = {sorted(dense_only)} with decoder_sparse_step = {step} gives MoE "
            f"layers {sparse}; mcore's MoE layers are every moe.layer_freq-th layer after the "
            "first moe.first_k_dense dense ones"
        )
    return first, freq


def _qwen_moe_sections(hf: dict[str, Any], *, shared: bool) -> dict[str, Any]:
    # Qwen3-MoE files name the count num_local_experts (transformers' attribute_map).
    if "num_local_experts" in hf:
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    hf = {**(_QWEN2_MOE_DEFAULTS if shared else _QWEN3_MOE_DEFAULTS), **hf}
    experts = hf["num_experts"]
    if experts < 1:
        raise NotImplementedError("num_experts = 0 is a dense model: use the dense Qwen mapping")
    first, freq = _sparse_layer_pattern(hf)
    shared_size = hf.get("shared_expert_intermediate_size") if shared else None
    if shared and not shared_size:
        raise NotImplementedError("shared_expert_intermediate_size must be >= 1")
    # Softmax over all experts, then the top k, renormalised only with norm_topk_prob.
    moe = MoEConfig(
        num_experts=experts,
        ffn_hidden_size=hf["moe_intermediate_size"],
        first_k_dense=first,
        layer_freq=freq,
        router_topk=hf["num_experts_per_tok"],
        router_score_function="softmax",
        router_pre_softmax=True,
        router_norm_topk_prob=bool(hf["norm_topk_prob"]),
        shared_expert_intermediate_size=shared_size,
        shared_expert_gate=shared,
    )
    return {"moe": _checked(moe)}


def _qwen_moe_layers_hf(cfg: TransformerConfig, moe: MoEConfig) -> dict[str, Any]:
    # Listing every dense layer expresses any mcore pattern exactly.
    return {"decoder_sparse_step": 1, "mlp_only_layers": list(dense_layers(cfg, moe))}


def _qwen_moe_common_hf(
    cfg: TransformerConfig, moe: MoEConfig, model_type: str, name: str
) -> dict[str, Any]:
    out = llama_like_hf(cfg, model_type, name)
    out.update(
        num_experts=moe.num_experts,
        moe_intermediate_size=moe.ffn_hidden_size or cfg.ffn_size,
        num_experts_per_tok=moe.router_topk,
        norm_topk_prob=_softmax_renormalised(moe),
        use_sliding_window=False,
        **_qwen_moe_layers_hf(cfg, moe),
    )
    return out


def _qwen_moe_router_checks(moe: MoEConfig) -> dict[str, bool]:
    return {
        "scores other than softmax": moe.router_score_function == "softmax",
        "group-limited routing": moe.router_num_groups is None,
        "router_topk_scaling_factor": moe.router_topk_scaling_factor in (None, 1.0),
        "router_enable_expert_bias": not moe.router_enable_expert_bias,
    }


def _qwen_moe_params(
    cfg: TransformerConfig, sections: Sections, arch: str, *, shared: bool
) -> list[ParamMap]:
    moe = _moe_section(sections, arch)
    return [
        *outer_params(cfg),
        *layer_norm_params(),
        *attention_params(cfg),
        *gated_mlp_params("layers.{i}.mlp", "model.layers.{i}.mlp", layers=dense_layers(cfg, moe)),
        *moe_params(
            moe,
            moe_layers(cfg, moe),
            "model.layers.{i}.mlp",
            shared="shared_expert" if shared else None,
            shared_gate="shared_expert_gate" if shared else None,
        ),
    ]


def _qwen2_moe_config(hf: dict[str, Any]) -> TransformerConfig:
    if hf.get("use_sliding_window"):
        raise NotImplementedError("use_sliding_window (sliding-window attention) is not supported")
    _require_silu(hf)
    hf = {**_QWEN2_MOE_DEFAULTS, **hf}
    return llama_like_config(hf, qkv_bias=bool(hf["qkv_bias"]), qk_norm=False)


def _qwen2_moe_hf(cfg: TransformerConfig, sections: Sections) -> dict[str, Any]:
    name = QWEN2_MOE.name
    moe = _moe_section(sections, name)
    _refuse_unless(
        {
            "add_bias_linear": not cfg.add_bias_linear,
            "qk_layernorm": not cfg.qk_layernorm,
            "MoE layers without a shared expert": moe.shared_expert_intermediate_size is not None,
            "a shared expert without its gate": moe.shared_expert_gate,
            **_qwen_moe_router_checks(moe),
        },
        name,
    )
    out = _qwen_moe_common_hf(cfg, moe, QWEN2_MOE.model_type, name)
    out.update(
        qkv_bias=cfg.add_qkv_bias,
        shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
    )
    return out


QWEN2_MOE = HFArchitecture(
    "Qwen2MoeForCausalLM",
    "qwen2_moe",
    to_config=_qwen2_moe_config,
    from_config=_qwen2_moe_hf,
    params=lambda cfg, sections: _qwen_moe_params(cfg, sections, QWEN2_MOE.name, shared=True),
    sections_from_hf=lambda hf: _qwen_moe_sections(hf, shared=True),
)


def _qwen3_moe_config(hf: dict[str, Any]) -> TransformerConfig:
    if hf.get("use_sliding_window"):
        raise NotImplementedError("use_sliding_window (sliding-window attention) is not supported")
    _require_silu(hf)
    if hf.get("attention_bias"):
        # q/k/v and o_proj get biases but the MLPs none: mcore ties o_proj's to the MLPs'.
        raise NotImplementedError("attention_bias = true is not supported for Qwen3-MoE")
    return llama_like_config(hf, qkv_bias=False, qk_norm=True)


def _qwen3_moe_hf(cfg: TransformerConfig, sections: Sections) -> dict[str, Any]:
    name = QWEN3_MOE.name
    moe = _moe_section(sections, name)
    _refuse_unless(
        {
            "qkv or linear biases": not (cfg.add_qkv_bias or cfg.add_bias_linear),
            "attention without qk_layernorm": cfg.qk_layernorm,
            "shared experts": moe.shared_expert_intermediate_size is None,
            **_qwen_moe_router_checks(moe),
        },
        name,
    )
    out = _qwen_moe_common_hf(cfg, moe, QWEN3_MOE.model_type, name)
    out["attention_bias"] = False
    return out


QWEN3_MOE = HFArchitecture(
    "Qwen3MoeForCausalLM",
    "qwen3_moe",
    to_config=_qwen3_moe_config,
    from_config=_qwen3_moe_hf,
    params=lambda cfg, sections: _qwen_moe_params(cfg, sections, QWEN3_MOE.name, shared=False),
    sections_from_hf=lambda hf: _qwen_moe_sections(hf, shared=False),
)


# --- DeepSeek-V3 ------------------------------------------------------------------------------


def _deepseek_config(hf: dict[str, Any]) -> TransformerConfig:
    hf = {**_DEEPSEEK_V3_DEFAULTS, **hf}
    heads = hf["num_attention_heads"]
    if hf.get("attention_bias"):
        raise NotImplementedError("attention_bias = true is not supported for DeepSeek-V3 (MLA)")
    if hf["rope_interleave"] is not True:
        # Files in DeepSeek's own layout interleave rope rows, which the weight map reorders;
        # a file already in rotate-half order would need a second map.
        raise NotImplementedError("rope_interleave = false is not supported (DeepSeek's is true)")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise NotImplementedError(
            f"num_key_value_heads = {hf['num_key_value_heads']}: MLA needs it equal to "
            f"num_attention_heads ({heads})"
        )
    _require_silu(hf)
    rope = rope_from_hf(hf)
    depths = _deepseek_mtp_depths(hf)
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("mscale_all_dim") and rope.get("rope_scaling") != "yarn":
        # transformers scales MLA's softmax by mscale_all_dim for any scaled rope; mcore for yarn.
        raise NotImplementedError("rope_parameters.mscale_all_dim needs rope_type = 'yarn'")
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        multi_latent_attention=True,
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        mtp_num_layers=depths or None,
        **rope,
    )


def _deepseek_mtp_depths(hf: dict[str, Any]) -> int:
    """Multi-token-prediction depths of a config.json: ``num_nextn_predict_layers`` (or its
    alias ``num_mtp_layers``); absent means none."""
    depths = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
    if not isinstance(depths, int) or depths < 0:
        raise NotImplementedError(f"num_nextn_predict_layers = {depths!r}: expected an int >= 0")
    return depths


def _deepseek_sections(hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**_DEEPSEEK_V3_DEFAULTS, **hf}
    if not hf["n_shared_experts"]:
        raise NotImplementedError("n_shared_experts = 0 is not supported")
    groups, group_topk = hf["n_group"], hf["topk_group"]
    if not groups or groups == 1:  # a single group limits nothing
        groups = group_topk = None
    moe = MoEConfig(
        num_experts=hf["n_routed_experts"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        first_k_dense=min(hf["first_k_dense_replace"] or 0, hf["num_hidden_layers"]),
        layer_freq=1,  # transformers ignores moe_layer_freq: every later layer is MoE
        router_topk=hf["num_experts_per_tok"],
        router_score_function="sigmoid",
        router_pre_softmax=False,
        router_norm_topk_prob=bool(hf["norm_topk_prob"]),
        router_num_groups=groups,
        router_group_topk=group_topk,
        router_topk_scaling_factor=float(hf["routed_scaling_factor"]),
        router_enable_expert_bias=True,
        shared_expert_intermediate_size=hf["n_shared_experts"] * hf["moe_intermediate_size"],
        shared_expert_gate=False,
    )
    return {"moe": _checked(moe)}


def _deepseek_hf(cfg: TransformerConfig, sections: Sections) -> dict[str, Any]:
    name = DEEPSEEK_V3.name
    moe = _moe_section(sections, name)
    ffn = moe.ffn_hidden_size or cfg.ffn_size
    shared = moe.shared_expert_intermediate_size
    dense = dense_layers(cfg, moe)
    mtp_after_moe = not cfg.mtp_depth or moe.is_moe_layer(cfg.num_layers - 1)
    _refuse_unless(
        {
            "RMSNorm and swiglu only": cfg.normalization == "RMSNorm"
            and cfg.activation == "swiglu",
            "attention other than multi-latent": cfg.multi_latent_attention,
            "linear biases": not (cfg.add_bias_linear or cfg.add_qkv_bias),
            "dense layers other than the first k (moe.layer_freq)": dense
            == tuple(range(len(dense))),
            "scores other than sigmoid": moe.router_score_function == "sigmoid",
            "no expert bias (DeepSeek-V3 always has e_score_correction_bias)": (
                moe.router_enable_expert_bias
            ),
            "shared experts other than n x moe.ffn_hidden_size": shared is not None
            and shared % ffn == 0,
            "shared_expert_gate": not moe.shared_expert_gate,
            "a hybrid layer pattern": cfg.hybrid_override_pattern is None,
            # mcore builds the MTP layers like the last main layer; DeepSeek-V3's are MoE.
            "multi-token prediction after a dense last layer": mtp_after_moe,
        },
        name,
    )
    assert shared is not None  # refused above otherwise
    rope = rope_to_hf(cfg)
    return {
        "architectures": [name],
        "model_type": DEEPSEEK_V3.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "moe_intermediate_size": ffn,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_head_dim,
        "qk_rope_head_dim": cfg.qk_pos_emb_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_interleave": True,  # DeepSeek's own layout; mla_params re-interleaves the rows
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": shared // ffn,
        "num_experts_per_tok": moe.router_topk,
        "first_k_dense_replace": len(dense),
        "n_group": moe.router_num_groups or 1,
        "topk_group": moe.router_group_topk or 1,
        "norm_topk_prob": moe.router_norm_topk_prob,
        "routed_scaling_factor": moe.router_topk_scaling_factor or 1.0,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "attention_bias": False,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": cfg.attention_dropout,
        "torch_dtype": "float32",
        **rope,
    }


def mla_params(cfg: TransformerConfig) -> list[ParamMap]:
    """DeepSeek's multi-latent attention weights, whose interleaved rope rows are reordered for
    mcore's rotate-half rope on the way in (and back on the way out)."""
    attn, mcore = "model.layers.{i}.self_attn", "layers.{i}.self_attention"
    nope, rope = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
    # Rope is applied to these projections' outputs: permuting their rows once makes
    # rotate-half rope give exactly DeepSeek's interleaved-pair rope.
    q_rows = Deinterleave(block=nope + rope, start=nope, size=rope)
    kv_rows = Deinterleave(block=cfg.kv_lora_rank + rope, start=cfg.kv_lora_rank, size=rope)
    if cfg.q_lora_rank is None:
        q = [
            ParamMap(
                f"{mcore}.linear_q_proj.weight", (f"{attn}.q_proj.weight",), "column", rows=q_rows
            )
        ]
    else:
        q = [
            ParamMap(
                f"{mcore}.linear_q_down_proj.weight", (f"{attn}.q_a_proj.weight",), "replicated"
            ),
            ParamMap(
                f"{mcore}.q_layernorm.weight", (f"{attn}.q_a_layernorm.weight",), "replicated"
            ),
            ParamMap(
                f"{mcore}.linear_q_proj.weight", (f"{attn}.q_b_proj.weight",), "column", rows=q_rows
            ),
        ]
    return [
        *q,
        ParamMap(
            f"{mcore}.linear_kv_down_proj.weight",
            (f"{attn}.kv_a_proj_with_mqa.weight",),
            "replicated",
            rows=kv_rows,
        ),
        ParamMap(f"{mcore}.kv_layernorm.weight", (f"{attn}.kv_a_layernorm.weight",), "replicated"),
        ParamMap(f"{mcore}.linear_kv_up_proj.weight", (f"{attn}.kv_b_proj.weight",), "column"),
        ParamMap(f"{mcore}.linear_proj.weight", (f"{attn}.o_proj.weight",), "row"),
    ]


def _deepseek_moe_params(moe: MoEConfig, layers: tuple[int, ...] | None) -> list[ParamMap]:
    return moe_params(
        moe,
        layers,
        "model.layers.{i}.mlp",
        expert_bias="gate.e_score_correction_bias",
        shared="shared_experts",
    )


def _deepseek_params(cfg: TransformerConfig, sections: Sections) -> list[ParamMap]:
    moe = _moe_section(sections, DEEPSEEK_V3.name)
    return [
        *outer_params(cfg),
        *layer_norm_params(),
        *mla_params(cfg),
        *gated_mlp_params("layers.{i}.mlp", "model.layers.{i}.mlp", layers=dense_layers(cfg, moe)),
        *_deepseek_moe_params(moe, moe_layers(cfg, moe)),
        *_deepseek_mtp_params(cfg, moe),
    ]


def _deepseek_mtp_params(cfg: TransformerConfig, moe: MoEConfig) -> list[ParamMap]:
    """The multi-token-prediction depths: depth ``k`` is HF layer ``num_layers + k``, an MoE
    decoder layer (mcore's block ``0``) with ``enorm``, ``hnorm``, ``eh_proj`` and
    ``shared_head.norm`` (the depth's final norm). The layer's ``embed_tokens`` and
    ``shared_head.head`` in DeepSeek's files copy the main model's, which mcore shares: they
    are not read, nor written (transformers' ``MtpModel`` ignores them too)."""
    if not cfg.mtp_depth:
        return []
    if not moe.is_moe_layer(cfg.num_layers - 1):
        # transformers builds MTP layers as MoE layers whatever first_k_dense_replace says;
        # mcore gives them the last main layer's spec, here dense.
        raise NotImplementedError(
            f"num_nextn_predict_layers = {cfg.mtp_depth} with first_k_dense_replace covering "
            f"every layer ({cfg.num_layers}): DeepSeek-V3's MTP layers are MoE layers, but mcore "
            "builds them like the last main layer, which is dense"
        )
    layer = [*layer_norm_params(), *mla_params(cfg), *_deepseek_moe_params(moe, None)]
    params = []
    for k in range(cfg.mtp_depth):
        n = cfg.num_layers + k
        hf = f"model.layers.{n}"
        params += mtp_depth_params(
            k,
            enorm=f"{hf}.enorm.weight",
            hnorm=f"{hf}.hnorm.weight",
            eh_proj=f"{hf}.eh_proj.weight",
            final_layernorm=f"{hf}.shared_head.norm.weight",
        )
        params += mtp_block_params(layer, k, 0, n)
    return params


DEEPSEEK_V3 = HFArchitecture(
    "DeepseekV3ForCausalLM",
    "deepseek_v3",
    to_config=_deepseek_config,
    from_config=_deepseek_hf,
    params=_deepseek_params,
    sections_from_hf=_deepseek_sections,
)
