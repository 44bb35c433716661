"""Hugging Face hybrid architectures: Nemotron-H and Qwen3-Next.

Both become layer-pattern ``GPTModel``s (``hybrid_override_pattern``) with an ``[ssm]`` section
sizing their Mamba-2 (``M``) or gated-delta-net (``G``) layers, plus a ``[moe]`` section
(mcore-moe) when they have MoE layers.

- Nemotron-H: HF block ``i`` (one pre-norm and one mixer) is mcore layer ``i``;
  ``layers_block_type`` gives the symbols (``linear_attention`` M, ``full_attention`` *, ``mlp``
  -, ``moe`` E). Attention has no rope, MLPs and experts are non-gated (``relu2``), the router
  takes sigmoid scores with a score-correction bias and group-limited top-k.
- Qwen3-Next: HF layer ``i`` (a token mixer and an MLP) is mcore layers ``2i`` (``G`` or ``*``)
  and ``2i + 1`` (``E`` or ``-``). Norms are zero-centred, attention has an output gate, qk-norm
  and partial rope; MoE blocks have a softmax router and a gated shared expert.

Multi-token prediction (``num_nextn_predict_layers`` depths) becomes the pattern's ``/`` blocks,
one per depth:

- Nemotron-H: each depth is the blocks of ``mtp_layers_block_type`` (e.g. ``/*E``), stored as
  Megatron-Bridge and vLLM do: depth ``k``'s block ``j`` is ``mtp.layers.{k * L + j}`` (``L``
  blocks a depth) with Nemotron-H's block names, its first block also holding ``enorm``,
  ``hnorm`` and ``eh_proj`` and its last ``final_layernorm``. transformers has no Nemotron-H MTP
  (it ignores ``mtp.*``).
- Qwen3-Next: one depth, a full-attention decoder layer (``/*E``, or ``/*-`` where HF layer 0
  is dense, as transformers and vLLM choose its MLP), stored as the released checkpoints do:
  ``mtp.fc`` (eh_proj), ``mtp.pre_fc_norm_embedding`` / ``mtp.pre_fc_norm_hidden`` (enorm /
  hnorm), ``mtp.layers.0.*`` and ``mtp.norm`` (the final norm). The released config.json does
  not count the depth; :func:`mcore.models.hf.read_hf_config` reads it from the weights.

transformers is the oracle of what a config.json means: where it ignores a field (Nemotron-H's
``time_step_limit``, ``attention_bias``, ``residual_in_fp32``) so does this mapping; what
mcore cannot express is refused with ``NotImplementedError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from mcore.core import ConfigError, ConfigErrors, McoreError
from mcore.models.config import TransformerConfig
from mcore.models.hf import mtp_block_params, mtp_depth_params
from mcore.models.hf.architectures import (
    HFArchitecture,
    ParamMap,
    Sections,
    Split,
    attention_params,
    gated_mlp_params,
    outer_params,
    rope_from_hf,
    rope_to_hf,
)
from mcore.models.hybrid import MTP_SEPARATOR
from mcore.ssm.config import SSMConfig

__all__ = ["NEMOTRON_H", "QWEN3_NEXT"]


# --- shared helpers ---------------------------------------------------------------------------


def _checked(section: Any, name: str) -> Any:
    """``section`` after its own validation (a ``ConfigError`` naming ``[name]`` fields)."""
    errors = ConfigErrors(f"{name}.")
    section.validate(errors)
    if errors:
        raise ConfigError(errors.messages)
    return section


def _moe_config(arch: str, **fields: Any) -> Any:
    """A checked ``MoEConfig``; MoE layers need mcore-moe, which mcore-ssm does not require."""
    try:
        from mcore.moe.config import MoEConfig
    except ImportError:
        raise McoreError(
            f"this {arch} model has MoE layers, which need mcore-moe: pip install mcore-moe"
        ) from None
    return _checked(MoEConfig(**fields), "moe")


def _refuse_unless(checks: dict[str, bool], arch: str) -> None:
    """Raise naming every mcore setting ``arch`` cannot express (those mapped to False)."""
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        raise NotImplementedError(f"{arch} cannot express: {'; '.join(bad)}")


def _layers_of(cfg: TransformerConfig, symbols: str) -> tuple[int, ...]:
    """The mcore layers whose pattern symbol is one of ``symbols``."""
    pattern = cfg.layer_pattern
    assert pattern is not None
    return tuple(i for i, s in enumerate(pattern.layers) if s in symbols)


def _at(params: list[ParamMap], layers: tuple[int, ...]) -> list[ParamMap]:
    """``params`` (per-layer maps) restricted to ``layers``."""
    return [dataclasses.replace(pm, layers=layers) for pm in params]


def _renumber(params: list[ParamMap], hf_layer: Callable[[int], int], n: int) -> list[ParamMap]:
    """Per-layer maps whose HF layer differs from the mcore one, written out layer by layer:
    ``{i}`` in mcore names is mcore layer ``j``, in HF names HF layer ``hf_layer(j)``."""
    out = []
    for pm in params:
        if not pm.per_layer():
            out.append(pm)
            continue
        for j in pm.layer_numbers(n):
            hf = tuple(h.replace("{i}", str(hf_layer(j))) for h in pm.hf)
            out.append(
                dataclasses.replace(pm, mcore=pm.mcore.replace("{i}", str(j)), hf=hf, layers=None)
            )
    return out


# Nemotron-H's MLPs and experts are not gated (relu2): up and down projections only.
_PLAIN_MLP = (None, "up_proj", "down_proj")


def _common_checks(cfg: TransformerConfig) -> dict[str, bool]:
    """What neither architecture has."""
    return {
        "normalization other than RMSNorm": cfg.normalization == "RMSNorm",
        "multi_latent_attention": not cfg.multi_latent_attention,
        "add_qkv_bias": not cfg.add_qkv_bias,
        "add_bias_linear": not cfg.add_bias_linear,
    }


# --- Nemotron-H -------------------------------------------------------------------------------

# What transformers' NemotronHConfig assumes for fields a config.json leaves out.
_NEMOTRON_H_DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "tie_word_embeddings": False,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "attention_dropout": 0.0,
    "sliding_window": None,
    "intermediate_size": 21504,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "ssm_state_size": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "mamba_hidden_act": "silu",
    "n_groups": 8,
    "conv_kernel": 4,
    "expand": 2,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "use_conv_bias": True,
    "chunk_size": 128,
    "mamba_proj_bias": False,
    "n_routed_experts": 8,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "moe_latent_size": None,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "use_bias": False,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-5,
    "num_nextn_predict_layers": 0,
}
# Older config.json files use Megatron-style names; transformers renames them on load.
_NEMOTRON_H_LEGACY = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "layer_types": "layers_block_type",
}
# Layer type names older files use, renamed as transformers does.
_LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
_NEMOTRON_H_SYMBOLS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
_NEMOTRON_H_TYPES = {symbol: kind for kind, symbol in _NEMOTRON_H_SYMBOLS.items()}
_NEMOTRON_H_ACTIVATIONS = {"relu2": "squared_relu", "gelu": "gelu"}
_NEMOTRON_H_MTP_DEFAULT = ["full_attention", "moe"]


def _nemotron_h_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json with legacy names renamed and transformers' defaults filled in."""
    hf = dict(hf)
    for old, new in _NEMOTRON_H_LEGACY.items():
        if old in hf and new not in hf:
            hf[new] = hf.pop(old)
    if "layers_block_type" not in hf:
        legacy = hf.get("hybrid_override_pattern")
        if legacy is not None:
            try:
                hf["layers_block_type"] = [_NEMOTRON_H_TYPES[s] for s in legacy]
            except KeyError as error:
                raise NotImplementedError(
                    f"hybrid_override_pattern {legacy!r}: unknown layer symbol {error}"
                ) from None
        else:
            hf["layers_block_type"] = ["linear_attention", "moe", "full_attention", "mlp"]
    hf["layers_block_type"] = [_LEGACY_LAYER_TYPES.get(t, t) for t in hf["layers_block_type"]]
    if "head_dim" not in hf and "attention_head_dim" in hf:  # the name early files used
        hf["head_dim"] = hf["attention_head_dim"]
    # The MTP blocks: transformers' default, unless the list is left at it and the pattern
    # Megatron-Bridge writes (mtp_hybrid_override_pattern) says otherwise.
    mtp_types = [_LEGACY_LAYER_TYPES.get(t, t) for t in hf.get("mtp_layers_block_type") or []]
    legacy_mtp = hf.get("mtp_hybrid_override_pattern")
    if mtp_types in ([], _NEMOTRON_H_MTP_DEFAULT) and legacy_mtp:
        try:
            mtp_types = [_NEMOTRON_H_TYPES[s] for s in legacy_mtp]
        except KeyError as error:
            raise NotImplementedError(
                f"mtp_hybrid_override_pattern {legacy_mtp!r}: unknown layer symbol {error}"
            ) from None
    hf["mtp_layers_block_type"] = mtp_types or list(_NEMOTRON_H_MTP_DEFAULT)
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        hf["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    return {**_NEMOTRON_H_DEFAULTS, **hf}


def _nemotron_h_pattern(hf: dict[str, Any], field: str = "layers_block_type") -> str:
    kinds = hf[field]
    unknown = sorted(set(kinds) - set(_NEMOTRON_H_SYMBOLS))
    if unknown:
        raise NotImplementedError(f"{field} holds unknown layer types {unknown}")
    return "".join(_NEMOTRON_H_SYMBOLS[k] for k in kinds)


def _nemotron_h_mtp(hf: dict[str, Any]) -> tuple[str, ...]:
    """One pattern block per MTP depth (``num_nextn_predict_layers``), each the symbols of
    ``mtp_layers_block_type``."""
    depths = hf["num_nextn_predict_layers"] or 0
    if not isinstance(depths, int) or depths < 0:
        raise NotImplementedError(f"num_nextn_predict_layers = {depths!r}: expected an int >= 0")
    if not depths:
        return ()
    block = _nemotron_h_pattern(hf, "mtp_layers_block_type")
    if not block:
        raise NotImplementedError("mtp_layers_block_type is empty: an MTP depth needs a layer")
    return (block,) * depths


def _nemotron_h_config(hf: dict[str, Any]) -> TransformerConfig:
    hf = _nemotron_h_fields(hf)
    if hf["sliding_window"] is not None:
        raise NotImplementedError("sliding_window (sliding-window attention) is not supported")
    act = hf["mlp_hidden_act"]
    if act not in _NEMOTRON_H_ACTIVATIONS:
        raise NotImplementedError(f"mlp_hidden_act {act!r} is not supported (relu2, gelu)")
    if hf["mlp_bias"]:
        # mcore's add_bias_linear would also give attention's o_proj a bias, which HF never has.
        raise NotImplementedError("mlp_bias = true is not supported for Nemotron-H")
    return _hybrid_config(
        hf,
        _nemotron_h_pattern(hf),
        _nemotron_h_mtp(hf),
        norm_epsilon=float(hf["layer_norm_epsilon"]),
        activation=_NEMOTRON_H_ACTIVATIONS[act],
        add_qkv_bias=False,  # transformers builds q/k/v/o without biases, whatever attention_bias
        add_bias_linear=False,
        position_embedding_type="none",
        # transformers never ties Nemotron-H's lm_head (its _tied_weights_keys is empty).
        untie_embeddings_and_output_weights=True,
    )


def _hybrid_config(
    hf: dict[str, Any], pattern: str, mtp: tuple[str, ...], **fields: Any
) -> TransformerConfig:
    """The ``TransformerConfig`` fields both hybrids read alike from config.json, plus
    ``fields``: main layers ``pattern``, then a ``/`` block per MTP depth of ``mtp``."""
    heads, head_dim = hf["num_attention_heads"], hf["head_dim"]
    return TransformerConfig(
        num_layers=len(pattern),
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf["num_key_value_heads"] or heads,
        kv_channels=head_dim if head_dim and head_dim != hf["hidden_size"] // heads else None,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        normalization="RMSNorm",
        init_method_std=float(hf["initializer_range"]),
        attention_dropout=float(hf["attention_dropout"]),
        hybrid_override_pattern=pattern + "".join(MTP_SEPARATOR + block for block in mtp),
        **fields,
    )


def _nemotron_h_sections(hf: dict[str, Any]) -> dict[str, Any]:
    hf = _nemotron_h_fields(hf)
    if hf["mamba_hidden_act"] != "silu":
        raise NotImplementedError(f"mamba_hidden_act {hf['mamba_hidden_act']!r} (only silu)")
    if bool(hf["mamba_proj_bias"]) != bool(hf["use_bias"]):
        raise NotImplementedError(
            f"mamba_proj_bias = {hf['mamba_proj_bias']} differs from use_bias = {hf['use_bias']} "
            "(transformers gives the Mamba projections biases by use_bias): ambiguous"
        )
    pattern = _nemotron_h_pattern(hf) + "".join(_nemotron_h_mtp(hf))
    ssm = SSMConfig(
        mamba_state_dim=hf["ssm_state_size"],
        mamba_head_dim=hf["mamba_head_dim"],
        mamba_num_groups=hf["n_groups"],
        mamba_num_heads=hf["mamba_num_heads"],
        mamba_expand=hf["expand"],
        mamba_conv_kernel=hf["conv_kernel"],
        mamba_conv_bias=bool(hf["use_conv_bias"]),
        mamba_proj_bias=bool(hf["use_bias"]),
        mamba_chunk_size=hf["chunk_size"],
        mamba_dt_min=float(hf["time_step_min"]),
        mamba_dt_max=float(hf["time_step_max"]),
        mamba_dt_init_floor=float(hf["time_step_floor"]),
        # transformers clamps the time step at time_step_min (time_step_limit is not read).
        mamba_dt_limit_min=float(hf["time_step_min"]),
        mamba_dt_limit_max=math.inf,
    )
    sections: dict[str, Any] = {"ssm": _checked(ssm, "ssm")}
    if "E" not in pattern:
        return sections
    if hf["moe_latent_size"] is not None:
        raise NotImplementedError("moe_latent_size (latent MoE projections) is not supported")
    shared = hf["moe_shared_expert_intermediate_size"]
    if not shared or shared < 1:
        raise NotImplementedError("moe_shared_expert_intermediate_size must be >= 1")
    groups, group_topk = hf["n_group"], hf["topk_group"]
    if not groups or groups == 1:  # one group limits nothing
        groups = group_topk = None
    # Sigmoid scores, chosen with a score-correction bias among the best groups, optionally
    # renormalised, then scaled; one non-gated shared expert.
    sections["moe"] = _moe_config(
        NEMOTRON_H.name,
        num_experts=hf["n_routed_experts"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        router_topk=hf["num_experts_per_tok"],
        router_score_function="sigmoid",
        router_pre_softmax=False,
        router_norm_topk_prob=bool(hf["norm_topk_prob"]),
        router_num_groups=groups,
        router_group_topk=group_topk,
        router_topk_scaling_factor=float(hf["routed_scaling_factor"]),
        router_enable_expert_bias=True,
        shared_expert_intermediate_size=shared,
        shared_expert_gate=False,
    )
    return sections


def _ssm_section(sections: Sections | None) -> SSMConfig:
    return (sections or {}).get("ssm") or SSMConfig()


def _pattern_of(cfg: TransformerConfig, arch: str) -> tuple[str, tuple[str, ...]]:
    """The main layers' symbols and the MTP depths' blocks of ``cfg``'s pattern."""
    pattern = cfg.layer_pattern
    if pattern is None:
        raise NotImplementedError(f"{arch} needs a hybrid_override_pattern (a hybrid model)")
    if cfg.mtp_num_layers is not None and cfg.mtp_num_layers != len(pattern.mtp_layers):
        raise NotImplementedError(
            f"{arch}: mtp_num_layers = {cfg.mtp_num_layers} without one '/' block of "
            "hybrid_override_pattern per depth; HF names each depth's layers"
        )
    return pattern.layers, pattern.mtp_layers


def _moe_section(sections: Sections | None, arch: str) -> Any:
    moe = (sections or {}).get("moe")
    if moe is None or moe.num_experts is None:
        raise NotImplementedError(
            f"{arch}: the pattern has MoE (E) layers, so the model needs a [moe] section"
        )
    return moe


def _nemotron_h_hf(cfg: TransformerConfig, sections: Sections) -> dict[str, Any]:
    name = NEMOTRON_H.name
    pattern, mtp = _pattern_of(cfg, name)
    ssm = _ssm_section(sections)
    act = {v: k for k, v in _NEMOTRON_H_ACTIVATIONS.items()}
    symbols = set(pattern).union(*mtp)
    _refuse_unless(
        {
            **_common_checks(cfg),
            "layer symbols other than M * - E": symbols <= set(_NEMOTRON_H_TYPES),
            # config.json has one mtp_layers_block_type for every depth.
            "MTP depths with different blocks": len(set(mtp)) <= 1,
            "activation other than squared_relu or gelu": cfg.activation in act,
            "qk_layernorm": not cfg.qk_layernorm,
            "attention_output_gate": not cfg.attention_output_gate,
            "layernorm_zero_centered_gamma": not cfg.layernorm_zero_centered_gamma,
            "position embeddings (Nemotron-H attention has none)": cfg.position_embedding_type
            == "none",
            "tied embeddings (transformers never ties Nemotron-H's lm_head)": (
                cfg.untie_embeddings_and_output_weights
            ),
            "ssm.mamba_dt_limit_max (transformers clamps only from below)": math.isinf(
                ssm.mamba_dt_limit_max
            ),
            "ssm.mamba_dt_limit_min other than ssm.mamba_dt_min (HF's time_step_min is both)": (
                ssm.mamba_dt_limit_min == ssm.mamba_dt_min
            ),
        },
        name,
    )
    out: dict[str, Any] = {
        "architectures": [name],
        "model_type": NEMOTRON_H.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [_NEMOTRON_H_TYPES[s] for s in pattern],
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "sliding_window": None,
        "intermediate_size": cfg.ffn_size,
        "mlp_hidden_act": act[cfg.activation],
        "mlp_bias": False,
        "ssm_state_size": ssm.mamba_state_dim,
        "mamba_num_heads": ssm.mamba_heads(cfg.hidden_size),
        "mamba_head_dim": ssm.mamba_head_dim,
        "mamba_hidden_act": "silu",
        "n_groups": ssm.mamba_num_groups,
        "conv_kernel": ssm.mamba_conv_kernel,
        "expand": ssm.mamba_expand,
        "time_step_min": ssm.mamba_dt_min,
        "time_step_max": ssm.mamba_dt_max,
        "time_step_floor": ssm.mamba_dt_init_floor,
        "use_conv_bias": ssm.mamba_conv_bias,
        "chunk_size": ssm.mamba_chunk_size,
        "mamba_proj_bias": ssm.mamba_proj_bias,
        "use_bias": ssm.mamba_proj_bias,
        "num_nextn_predict_layers": len(mtp),
        "residual_in_fp32": False,
        "tie_word_embeddings": False,
        "layer_norm_epsilon": cfg.norm_epsilon,
        "initializer_range": cfg.init_method_std,
        "torch_dtype": "float32",
    }
    if mtp:
        # transformers' field, and the pattern Megatron-Bridge writes and vLLM reads.
        out["mtp_layers_block_type"] = [_NEMOTRON_H_TYPES[s] for s in mtp[0]]
        out["mtp_hybrid_override_pattern"] = mtp[0]
    if "E" in pattern + "".join(mtp):
        out.update(_nemotron_h_moe_hf(cfg, _moe_section(sections, name)))
    return out


def _nemotron_h_moe_hf(cfg: TransformerConfig, moe: Any) -> dict[str, Any]:
    name = NEMOTRON_H.name
    _refuse_unless(
        {
            "scores other than sigmoid": moe.router_score_function == "sigmoid",
            "no expert bias (Nemotron-H always has e_score_correction_bias)": (
                moe.router_enable_expert_bias
            ),
            "MoE layers without a shared expert": moe.shared_expert_intermediate_size is not None,
            "shared_expert_gate": not moe.shared_expert_gate,
        },
        name,
    )
    return {
        "n_routed_experts": moe.num_experts,
        "moe_intermediate_size": moe.ffn_hidden_size or cfg.ffn_size,
        "moe_shared_expert_intermediate_size": moe.shared_expert_intermediate_size,
        "n_shared_experts": 1,
        "moe_latent_size": None,
        "num_experts_per_tok": moe.router_topk,
        "n_group": moe.router_num_groups or 1,
        "topk_group": moe.router_group_topk or 1,
        "norm_topk_prob": moe.router_norm_topk_prob,
        "routed_scaling_factor": moe.router_topk_scaling_factor or 1.0,
    }


def mamba_params(
    cfg: TransformerConfig, ssm: SSMConfig, layers: tuple[int, ...] | None, hf: str
) -> list[ParamMap]:
    """Mamba-2 mixers of ``layers`` (None: every layer the maps are used for) from HF module
    ``hf`` (``{i}`` for the layer).

    HF's ``in_proj`` rows ``[z, x, B, C, dt]`` and conv channels ``[x, B, C]`` are each one
    tensor whose blocks mcore splits over TP on their own (``parts``); the per-head vectors and
    the gated norm's weight split by heads.
    """
    inner = ssm.mamba_heads(cfg.hidden_size) * ssm.mamba_head_dim
    gn = ssm.mamba_num_groups * ssm.mamba_state_dim
    heads = ssm.mamba_heads(cfg.hidden_size)
    proj_parts = (inner, inner, gn, gn, heads)
    conv_parts = (inner, gn, gn)
    m = "layers.{i}.mixer"

    def column(name: str, parts: tuple[int, ...] | None = None) -> ParamMap:
        return ParamMap(f"{m}.{name}", (f"{hf}.{name}",), "column", layers=layers, parts=parts)

    params = [
        column("in_proj.weight", proj_parts),
        column("conv1d.weight", conv_parts),
        column("dt_bias"),
        column("A_log"),
        column("D"),
        column("norm.weight"),
        ParamMap(f"{m}.out_proj.weight", (f"{hf}.out_proj.weight",), "row", layers=layers),
    ]
    if ssm.mamba_conv_bias:
        params.append(column("conv1d.bias", conv_parts))
    if ssm.mamba_proj_bias:
        params += [
            column("in_proj.bias", proj_parts),
            ParamMap(f"{m}.out_proj.bias", (f"{hf}.out_proj.bias",), "replicated", layers=layers),
        ]
    return params


def _nemotron_h_layer_params(
    cfg: TransformerConfig, sections: Sections, symbol: str, hf: str
) -> list[ParamMap]:
    """Per-layer maps of an mcore layer with pattern ``symbol``, from the Nemotron-H block
    ``hf`` (``{i}`` for the layer): its one norm and its mixer."""
    norm = "input_layernorm" if symbol in "M*" else "pre_mlp_layernorm"
    params = [ParamMap(f"layers.{{i}}.{norm}.weight", (f"{hf}.norm.weight",), "replicated")]
    if symbol == "M":
        return params + mamba_params(cfg, _ssm_section(sections), None, f"{hf}.mixer")
    if symbol == "*":
        return params + attention_params(cfg, f"{hf}.mixer")
    if symbol == "-":
        return params + gated_mlp_params("layers.{i}.mlp", f"{hf}.mixer", names=_PLAIN_MLP)
    from mcore.moe.hf import moe_params

    # Router with a score-correction bias, non-gated experts and shared expert.
    return params + moe_params(
        _moe_section(sections, NEMOTRON_H.name),
        None,
        f"{hf}.mixer",
        experts=_PLAIN_MLP,
        expert_bias="gate.e_score_correction_bias",
        shared="shared_experts",
    )


def _nemotron_h_params(cfg: TransformerConfig, sections: Sections) -> list[ParamMap]:
    _, mtp = _pattern_of(cfg, NEMOTRON_H.name)
    params = [
        ParamMap("embedding.weight", ("backbone.embeddings.weight",), "vocab"),
        ParamMap("final_layernorm.weight", ("backbone.norm_f.weight",), "replicated"),
        ParamMap("output_layer.weight", ("lm_head.weight",), "vocab"),
    ]
    for symbol in "M*-E":
        layers = _layers_of(cfg, symbol)
        if layers:
            layer = _nemotron_h_layer_params(cfg, sections, symbol, "backbone.layers.{i}")
            params += _at(layer, layers)
    # Depth k's blocks are HF MTP layers k * L ... k * L + L - 1, numbered on across depths.
    base = 0
    for k, block in enumerate(mtp):
        first, last = f"mtp.layers.{base}", f"mtp.layers.{base + len(block) - 1}"
        params += mtp_depth_params(
            k,
            enorm=f"{first}.enorm.weight",
            hnorm=f"{first}.hnorm.weight",
            eh_proj=f"{first}.eh_proj.weight",
            final_layernorm=f"{last}.final_layernorm.weight",
        )
        for j, symbol in enumerate(block):
            layer = _nemotron_h_layer_params(cfg, sections, symbol, "mtp.layers.{i}")
            params += mtp_block_params(layer, k, j, base + j)
        base += len(block)
    return params


NEMOTRON_H = HFArchitecture(
    "NemotronHForCausalLM",
    "nemotron_h",
    to_config=_nemotron_h_config,
    from_config=_nemotron_h_hf,
    params=_nemotron_h_params,
    sections_from_hf=_nemotron_h_sections,
)


# --- Qwen3-Next -------------------------------------------------------------------------------

# What transformers' Qwen3NextConfig assumes for fields a config.json leaves out.
_QWEN3_NEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "head_dim": 256,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 10,
    "num_experts": 512,
    "norm_topk_prob": True,
    "mlp_only_layers": [],
}
_QWEN3_NEXT_MIXERS = {"linear_attention": "G", "full_attention": "*"}


def _qwen3_next_fields(hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**_QWEN3_NEXT_DEFAULTS, **hf}
    hf["mlp_only_layers"] = hf["mlp_only_layers"] or []
    if "layer_types" not in hf:
        interval = hf.get("full_attention_interval", 4)
        hf["layer_types"] = [
            "linear_attention" if (i + 1) % interval else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]
    hf["layer_types"] = [_LEGACY_LAYER_TYPES.get(t, t) for t in hf["layer_types"]]
    return hf


def _qwen3_next_sparse(hf: dict[str, Any], i: int) -> bool:
    """Whether HF layer ``i`` has a sparse MoE block (transformers' rule)."""
    step = hf["decoder_sparse_step"]
    return i not in hf["mlp_only_layers"] and hf["num_experts"] > 0 and (i + 1) % step == 0


def _qwen3_next_pattern(hf: dict[str, Any]) -> str:
    kinds = hf["layer_types"]
    if len(kinds) != hf["num_hidden_layers"]:
        raise NotImplementedError(
            f"layer_types has {len(kinds)} entries but num_hidden_layers is "
            f"{hf['num_hidden_layers']}"
        )
    unknown = sorted(set(kinds) - set(_QWEN3_NEXT_MIXERS))
    if unknown:
        raise NotImplementedError(f"layer_types holds unknown layer types {unknown}")
    return "".join(
        _QWEN3_NEXT_MIXERS[kind] + ("E" if _qwen3_next_sparse(hf, i) else "-")
        for i, kind in enumerate(kinds)
    )


def _qwen3_next_mtp(hf: dict[str, Any]) -> tuple[str, ...]:
    """The MTP depth's pattern block, if ``num_nextn_predict_layers`` (or ``num_mtp_layers``)
    gives one: a full-attention decoder layer whose MLP follows HF layer 0's rule, as
    transformers' ``MtpModel`` and vLLM build it."""
    depths = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
    if not isinstance(depths, int) or depths < 0:
        raise NotImplementedError(f"num_nextn_predict_layers = {depths!r}: expected an int >= 0")
    if depths > 1:
        # vLLM runs several such layers as successive draft steps behind one shared mtp.fc and
        # set of norms; mcore's depths each have their own.
        raise NotImplementedError(
            f"num_nextn_predict_layers = {depths}: Qwen3-Next's MTP layers share one fc and "
            "norms, which mcore's MTP depths do not; only 0 or 1 is supported"
        )
    if not depths:
        return ()
    kinds = hf.get("mtp_layer_types") or ["full_attention"]
    if list(kinds) != ["full_attention"]:
        raise NotImplementedError(
            f"mtp_layer_types = {kinds}: Qwen3-Next's MTP layer is one full-attention layer"
        )
    return ("*" + ("E" if _qwen3_next_sparse(hf, 0) else "-"),)


def _partial_rotary_factor(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
    return float(factor)


def _qwen3_next_config(hf: dict[str, Any]) -> TransformerConfig:
    hf = _qwen3_next_fields(hf)
    if hf["hidden_act"] not in ("silu", "swish"):
        # Also the activation of the gated delta net's convolution.
        raise NotImplementedError(f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if hf["attention_bias"]:
        # q/k/v and o_proj get biases but the MLPs none: mcore ties o_proj's to the MLPs'.
        raise NotImplementedError("attention_bias = true is not supported for Qwen3-Next")
    return _hybrid_config(
        hf,
        _qwen3_next_pattern(hf),
        _qwen3_next_mtp(hf),
        norm_epsilon=float(hf["rms_norm_eps"]),
        activation="swiglu",
        qk_layernorm=True,
        attention_output_gate=True,
        layernorm_zero_centered_gamma=True,
        rotary_percent=_partial_rotary_factor(hf),
        untie_embeddings_and_output_weights=not hf["tie_word_embeddings"],
        **rope_from_hf(hf),
    )


def _qwen3_next_sections(hf: dict[str, Any]) -> dict[str, Any]:
    hf = _qwen3_next_fields(hf)
    pattern = _qwen3_next_pattern(hf) + "".join(_qwen3_next_mtp(hf))
    ssm = SSMConfig(
        linear_conv_kernel_dim=hf["linear_conv_kernel_dim"],
        linear_key_head_dim=hf["linear_key_head_dim"],
        linear_value_head_dim=hf["linear_value_head_dim"],
        linear_num_key_heads=hf["linear_num_key_heads"],
        linear_num_value_heads=hf["linear_num_value_heads"],
    )
    sections: dict[str, Any] = {"ssm": _checked(ssm, "ssm")}
    if "E" not in pattern:
        return sections
    shared = hf["shared_expert_intermediate_size"]
    if not shared or shared < 1:
        raise NotImplementedError("shared_expert_intermediate_size must be >= 1")
    # Softmax over all experts, then the top k, renormalised with norm_topk_prob; a shared
    # expert scaled by its sigmoid gate.
    sections["moe"] = _moe_config(
        QWEN3_NEXT.name,
        num_experts=hf["num_experts"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        router_topk=hf["num_experts_per_tok"],
        router_score_function="softmax",
        router_pre_softmax=True,
        router_norm_topk_prob=bool(hf["norm_topk_prob"]),
        shared_expert_intermediate_size=shared,
        shared_expert_gate=True,
    )
    return sections


def _qwen3_next_hf(cfg: TransformerConfig, sections: Sections) -> dict[str, Any]:
    name = QWEN3_NEXT.name
    pattern, mtp = _pattern_of(cfg, name)
    pairs = [pattern[j : j + 2] for j in range(0, len(pattern), 2)]
    ssm = _ssm_section(sections)
    _refuse_unless(
        {
            **_common_checks(cfg),
            "layer patterns other than pairs of (G or *) and (E or -)": all(
                len(p) == 2 and p[0] in "G*" and p[1] in "E-" for p in pairs
            ),
            "more than one MTP depth": len(mtp) <= 1,
            "MTP blocks other than an attention and an MLP layer (*E or *-)": all(
                block in ("*E", "*-") for block in mtp
            ),
            # HF gives the MTP layer the MLP its rule gives layer 0.
            "an MTP MLP unlike layer 0's (HF chooses it by layer 0's rule)": all(
                not pairs or block[1] == pairs[0][1] for block in mtp
            ),
            "activation other than swiglu": cfg.activation == "swiglu",
            "attention without qk_layernorm": cfg.qk_layernorm,
            "attention without attention_output_gate": cfg.attention_output_gate,
            "norms without layernorm_zero_centered_gamma": cfg.layernorm_zero_centered_gamma,
            "position embeddings other than rope": cfg.position_embedding_type == "rope",
        },
        name,
    )
    rope = rope_to_hf(cfg)["rope_parameters"]
    rope["partial_rotary_factor"] = cfg.rotary_percent
    out: dict[str, Any] = {
        "architectures": [name],
        "model_type": QWEN3_NEXT.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": len(pairs),
        "layer_types": ["linear_attention" if p[0] == "G" else "full_attention" for p in pairs],
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "initializer_range": cfg.init_method_std,
        "linear_conv_kernel_dim": ssm.linear_conv_kernel_dim,
        "linear_key_head_dim": ssm.linear_key_head_dim,
        "linear_value_head_dim": ssm.linear_value_head_dim,
        "linear_num_key_heads": ssm.linear_num_key_heads,
        "linear_num_value_heads": ssm.linear_num_value_heads,
        # Listing every dense layer expresses any mix of MoE and dense MLPs.
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, p in enumerate(pairs) if p[1] == "-"],
        "rope_parameters": rope,
        "torch_dtype": "float32",
        # vLLM assumes one MTP layer where the count is missing: state it, even when 0.
        "num_nextn_predict_layers": len(mtp),
    }
    if mtp:
        # What transformers' generic MtpModel reads (it ignores num_nextn_predict_layers here).
        out.update(num_mtp_layers=len(mtp), mtp_layer_types=["full_attention"] * len(mtp))
    if "E" not in pattern:
        out["num_experts"] = 0
        return out
    moe = _moe_section(sections, name)
    _refuse_unless(
        {
            "scores other than softmax": moe.router_score_function == "softmax",
            "group-limited routing": moe.router_num_groups is None,
            "router_topk_scaling_factor": moe.router_topk_scaling_factor in (None, 1.0),
            "router_enable_expert_bias": not moe.router_enable_expert_bias,
            "MoE layers without a shared expert": moe.shared_expert_intermediate_size is not None,
            "a shared expert without its gate": moe.shared_expert_gate,
        },
        name,
    )
    out.update(
        num_experts=moe.num_experts,
        moe_intermediate_size=moe.ffn_hidden_size or cfg.ffn_size,
        shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
        num_experts_per_tok=moe.router_topk,
        # Softmax over the chosen k (no pre-softmax) is already renormalised.
        norm_topk_prob=moe.router_norm_topk_prob or not moe.router_pre_softmax,
    )
    return out


def gated_delta_net_params(
    ssm: SSMConfig, layers: tuple[int, ...] | None, hf: str
) -> list[ParamMap]:
    """Gated delta nets of ``layers`` (None: every layer the maps are used for) from HF module
    ``hf`` (``{i}`` for the layer).

    ``in_proj_qkvz``/``in_proj_ba`` keep HF's per-key-head grouping, so TP splits them evenly
    by rows; the conv splits its ``[q, k, v]`` channel blocks on their own, ``dt_bias`` and
    ``A_log`` by value heads; the norm weight (one head's width) is replicated.
    """
    key_dim = ssm.linear_num_key_heads * ssm.linear_key_head_dim
    value_dim = ssm.linear_num_value_heads * ssm.linear_value_head_dim
    m = "layers.{i}.mixer"

    def pm(name: str, split: Split, parts: tuple[int, ...] | None = None) -> ParamMap:
        return ParamMap(f"{m}.{name}", (f"{hf}.{name}",), split, layers=layers, parts=parts)

    return [
        pm("in_proj_qkvz.weight", "column"),
        pm("in_proj_ba.weight", "column"),
        pm("conv1d.weight", "column", (key_dim, key_dim, value_dim)),
        pm("dt_bias", "column"),
        pm("A_log", "column"),
        pm("norm.weight", "replicated"),
        pm("out_proj.weight", "row"),
    ]


def _qwen3_next_layer_params(
    cfg: TransformerConfig, sections: Sections, symbol: str, hf: str
) -> list[ParamMap]:
    """Per-layer maps of an mcore layer with pattern ``symbol``, from its half of the Qwen3-Next
    decoder layer ``hf`` (``{i}`` for the layer): the token mixer and its norm, or the MLP and
    its norm."""
    if symbol in "G*":
        norm = ParamMap(
            "layers.{i}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",), "replicated"
        )
        if symbol == "G":
            return [
                norm,
                *gated_delta_net_params(_ssm_section(sections), None, f"{hf}.linear_attn"),
            ]
        return [norm, *attention_params(cfg, f"{hf}.self_attn")]
    norm = ParamMap(
        "layers.{i}.pre_mlp_layernorm.weight",
        (f"{hf}.post_attention_layernorm.weight",),
        "replicated",
    )
    if symbol == "-":
        return [norm, *gated_mlp_params("layers.{i}.mlp", f"{hf}.mlp")]
    from mcore.moe.hf import moe_params

    moe = _moe_section(sections, QWEN3_NEXT.name)
    return [
        norm,
        *moe_params(
            moe, None, f"{hf}.mlp", shared="shared_expert", shared_gate="shared_expert_gate"
        ),
    ]


def _qwen3_next_params(cfg: TransformerConfig, sections: Sections) -> list[ParamMap]:
    _, mtp = _pattern_of(cfg, QWEN3_NEXT.name)
    per_layer = []
    for symbol in "G*-E":
        layers = _layers_of(cfg, symbol)
        if layers:
            per_layer += _at(
                _qwen3_next_layer_params(cfg, sections, symbol, "model.layers.{i}"), layers
            )
    # mcore layers 2i and 2i + 1 hold HF layer i's token mixer and MLP.
    params = [*outer_params(cfg), *_renumber(per_layer, lambda j: j // 2, cfg.num_layers)]
    for k, block in enumerate(mtp):  # one depth: HF's mtp.layers.0 is mcore's block 0 and 1
        params += mtp_depth_params(
            k,
            enorm="mtp.pre_fc_norm_embedding.weight",
            hnorm="mtp.pre_fc_norm_hidden.weight",
            eh_proj="mtp.fc.weight",
            final_layernorm="mtp.norm.weight",
        )
        for j, symbol in enumerate(block):
            layer = _qwen3_next_layer_params(cfg, sections, symbol, "mtp.layers.{i}")
            params += mtp_block_params(layer, k, j, k)
    return params


QWEN3_NEXT = HFArchitecture(
    "Qwen3NextForCausalLM",
    "qwen3_next",
    to_config=_qwen3_next_config,
    from_config=_qwen3_next_hf,
    params=_qwen3_next_params,
    sections_from_hf=_qwen3_next_sections,
)
