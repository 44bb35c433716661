"""Hugging Face architectures: how their config.json and weight names map onto a ``GPTModel``.

Each architecture is an :class:`HFArchitecture` registered under ``hf_architecture`` by the
``architectures[0]`` name in config.json; mcore-moe adds MoE architectures the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mcore.models.config import TransformerConfig

Split = Literal["column", "row", "vocab", "replicated"]
"""How a parameter is sharded over TP: output rows (column-parallel), input columns
(row-parallel), vocab rows (embeddings) or not at all."""


@dataclass(frozen=True)
class ParamMap:
    """One mcore parameter and the Hugging Face tensors it is made of.

    ``{i}`` in either name stands for the layer number. Several HF tensors are concatenated
    along dim 0 into one fused mcore tensor (q, k, v -> linear_qkv; gate, up -> linear_fc1), each
    part sharded over TP on its own.
    """

    mcore: str
    hf: tuple[str, ...]
    split: Split

    def per_layer(self) -> bool:
        return "{i}" in self.mcore


@dataclass(frozen=True)
class HFArchitecture:
    """A Hugging Face architecture: config translation both ways and the weight map."""

    name: str
    model_type: str
    to_config: Callable[[dict[str, Any]], TransformerConfig]
    from_config: Callable[[TransformerConfig], dict[str, Any]]
    params: Callable[[TransformerConfig], list[ParamMap]]


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 nests rope settings in rope_parameters; older files use rope_theta and
    # rope_scaling at the top level.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": float(theta)}
    if kind in (None, "default"):
        return out
    if kind not in ("linear", "llama3", "yarn"):
        raise NotImplementedError(f"rope_type {kind!r} is not supported yet")
    out.update(rope_scaling=kind, rope_scaling_factor=float(params.get("factor", 1.0)))
    if "original_max_position_embeddings" in params:
        out["rope_original_max_position_embeddings"] = int(
            params["original_max_position_embeddings"]
        )
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    if kind == "yarn":
        out.update(
            yarn_beta_fast=float(params.get("beta_fast", 32.0)),
            yarn_beta_slow=float(params.get("beta_slow", 1.0)),
            yarn_mscale=float(params.get("mscale", 1.0) or 1.0),
            yarn_mscale_all_dim=float(params.get("mscale_all_dim", 0.0) or 0.0),
        )
    return out


def _rope_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": cfg.rotary_base, "rope_type": "default"}
    if cfg.rope_scaling != "none":
        params.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
        if cfg.rope_original_max_position_embeddings is not None:
            params["original_max_position_embeddings"] = cfg.rope_original_max_position_embeddings
    if cfg.rope_scaling == "llama3":
        params.update(
            low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor
        )
    if cfg.rope_scaling == "yarn":
        params.update(
            beta_fast=cfg.yarn_beta_fast,
            beta_slow=cfg.yarn_beta_slow,
            mscale=cfg.yarn_mscale,
            mscale_all_dim=cfg.yarn_mscale_all_dim,
        )
    return {"rope_parameters": params}


_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "gelu", "relu2": "squared_relu"}


def _llama_like_config(
    hf: dict[str, Any], *, qkv_bias: bool | None, qk_norm: bool
) -> TransformerConfig:
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"hidden_act {act!r} is not supported")
    attention_bias = bool(hf.get("attention_bias", False))
    if hf.get("mlp_bias", False) != attention_bias and qkv_bias is None:
        raise NotImplementedError("attention_bias and mlp_bias must agree (add_bias_linear)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    return TransformerConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim and head_dim != hf["hidden_size"] // heads else None,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_ACTIVATIONS[act],
        add_qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        add_bias_linear=attention_bias if qkv_bias is None else False,
        qk_layernorm=qk_norm,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        **_rope_from_hf(hf),
    )


def _llama_like_hf(cfg: TransformerConfig, model_type: str, arch: str) -> dict[str, Any]:
    if cfg.normalization != "RMSNorm" or cfg.activation != "swiglu":
        raise NotImplementedError(f"{arch} needs RMSNorm and swiglu")
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": cfg.attention_dropout,
        "torch_dtype": "float32",
        **_rope_to_hf(cfg),
    }


def _llama_like_params(cfg: TransformerConfig) -> list[ParamMap]:
    attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    params = [
        ParamMap("embedding.weight", ("model.embed_tokens.weight",), "vocab"),
        ParamMap(
            "layers.{i}.input_layernorm.weight",
            ("model.layers.{i}.input_layernorm.weight",),
            "replicated",
        ),
        ParamMap(
            "layers.{i}.self_attention.linear_qkv.weight",
            (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
            "column",
        ),
        ParamMap("layers.{i}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",), "row"),
        ParamMap(
            "layers.{i}.pre_mlp_layernorm.weight",
            ("model.layers.{i}.post_attention_layernorm.weight",),
            "replicated",
        ),
        ParamMap(
            "layers.{i}.mlp.linear_fc1.weight",
            (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
            "column",
        ),
        ParamMap("layers.{i}.mlp.linear_fc2.weight", (f"{mlp}.down_proj.weight",), "row"),
        ParamMap("final_layernorm.weight", ("model.norm.weight",), "replicated"),
    ]
    if cfg.add_qkv_bias:
        params.append(
            ParamMap(
                "layers.{i}.self_attention.linear_qkv.bias",
                (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
                "column",
            )
        )
    if cfg.add_bias_linear:
        params += [
            ParamMap(
                "layers.{i}.self_attention.linear_proj.bias", (f"{attn}.o_proj.bias",), "replicated"
            ),
            ParamMap(
                "layers.{i}.mlp.linear_fc1.bias",
                (f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias"),
                "column",
            ),
            ParamMap("layers.{i}.mlp.linear_fc2.bias", (f"{mlp}.down_proj.bias",), "replicated"),
        ]
    if cfg.qk_layernorm:
        params += [
            ParamMap(
                "layers.{i}.self_attention.q_layernorm.weight",
                (f"{attn}.q_norm.weight",),
                "replicated",
            ),
            ParamMap(
                "layers.{i}.self_attention.k_layernorm.weight",
                (f"{attn}.k_norm.weight",),
                "replicated",
            ),
        ]
    if cfg.untie_embeddings_and_output_weights:
        params.append(ParamMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return params


def _family(name: str, model_type: str, *, qkv_bias: bool | None, qk_norm: bool) -> HFArchitecture:
    def to_config(hf: dict[str, Any]) -> TransformerConfig:
        return _llama_like_config(hf, qkv_bias=qkv_bias, qk_norm=qk_norm)

    def from_config(cfg: TransformerConfig) -> dict[str, Any]:
        out = _llama_like_hf(cfg, model_type, name)
        if qkv_bias is None:
            out.update(attention_bias=cfg.add_qkv_bias, mlp_bias=cfg.add_bias_linear)
        elif cfg.add_qkv_bias != qkv_bias or cfg.add_bias_linear:
            raise NotImplementedError(f"{name} has qkv bias={qkv_bias} and no other biases")
        if cfg.qk_layernorm != qk_norm:
            raise NotImplementedError(f"{name} has qk_layernorm={qk_norm}")
        return out

    return HFArchitecture(name, model_type, to_config, from_config, _llama_like_params)


LLAMA = _family("LlamaForCausalLM", "llama", qkv_bias=None, qk_norm=False)
MISTRAL = _family("MistralForCausalLM", "mistral", qkv_bias=False, qk_norm=False)
QWEN2 = _family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False)
QWEN3 = _family("Qwen3ForCausalLM", "qwen3", qkv_bias=None, qk_norm=True)
