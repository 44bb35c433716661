"""Hugging Face architectures: how their config.json and weight names map onto a ``GPTModel``.

Each architecture is an :class:`HFArchitecture` registered under ``hf_architecture`` by the
``architectures[0]`` name in config.json; mcore-moe adds MoE architectures the same way. An
architecture translates config.json into a ``TransformerConfig`` plus the config sections of
other packages (``{"moe": MoEConfig(...)}``) and back, and lists the weights as
:class:`ParamMap` rows that ``mcore.models.hf`` reads and writes for any parallel layout.

The helpers below (rope, Llama-like attention and MLP maps) are the building blocks other
packages' architectures are assembled from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mcore.models.config import TransformerConfig

if TYPE_CHECKING:
    import torch

Split = Literal["column", "row", "vocab", "replicated"]
"""How a parameter is sharded over its group: output rows (column-parallel), input columns
(row-parallel), vocab rows (embeddings) or not at all."""

Group = Literal["tp", "etp"]
"""The parallel group a parameter is split over: tensor parallel (dense layers) or expert
tensor parallel (routed experts)."""

Sections = Mapping[str, Any]
"""Config sections of other packages by name, e.g. ``{"moe": MoEConfig(...)}``."""


class RowTransform(Protocol):
    """A reordering of a HF tensor's rows that mcore's modules need (e.g. rope layout).

    Applied to each HF tensor on its own, before fused parts are concatenated. On load it sees
    only this rank's slice of rows, so it must act within blocks that a shard holds whole (one
    attention head, say); on save it sees the whole tensor.
    """

    def to_mcore(self, rows: torch.Tensor) -> torch.Tensor:
        """HF row order -> mcore row order."""
        ...

    def to_hf(self, rows: torch.Tensor) -> torch.Tensor:
        """mcore row order -> HF row order (the inverse of :meth:`to_mcore`)."""
        ...


@dataclass(frozen=True)
class Deinterleave:
    """Rotary rows stored as interleaved pairs ``(x0, y0, x1, y1, ...)`` (DeepSeek's
    ``rope_interleave``) reordered to the halves ``(x0, x1, ..., y0, y1, ...)`` that mcore's
    rotate-half rope pairs up.

    Rope rotates a linear projection's outputs, so permuting the projection's weight rows once
    gives rotate-half rope exactly the interleaved result. The tensor is a stack of blocks of
    ``block`` rows (one per head); rows ``start : start + size`` of each block are the rope rows.
    """

    block: int
    start: int
    size: int

    def __post_init__(self) -> None:
        if self.size % 2 or not 0 <= self.start <= self.start + self.size <= self.block:
            raise ValueError(
                f"Deinterleave(block={self.block}, start={self.start}, size={self.size}): the "
                "rope rows must be an even number inside the block"
            )

    def _index(self, rows: int, *, inverse: bool) -> torch.Tensor:
        import torch

        if rows % self.block:
            raise ValueError(
                f"{rows} rows are not whole blocks of {self.block} (one attention head each); "
                "the layout splits a head between ranks"
            )
        one = torch.arange(self.block)
        rope = one[self.start : self.start + self.size].clone()
        one[self.start : self.start + self.size] = torch.cat([rope[0::2], rope[1::2]])
        if inverse:
            one = torch.argsort(one)
        return (torch.arange(0, rows, self.block)[:, None] + one).flatten()

    def to_mcore(self, rows: torch.Tensor) -> torch.Tensor:
        """Interleaved pairs -> halves, block by block."""
        return rows[self._index(rows.shape[0], inverse=False)]

    def to_hf(self, rows: torch.Tensor) -> torch.Tensor:
        """Halves -> interleaved pairs, block by block."""
        return rows[self._index(rows.shape[0], inverse=True)]


@dataclass(frozen=True)
class ParamMap:
    """One mcore parameter (or persistent buffer) and the Hugging Face tensors it is made of.

    ``{i}`` in either name stands for the layer number, ``{e}`` in HF names for a global expert
    number. Several HF tensors are concatenated along dim 0 into one fused mcore tensor (q, k,
    v -> linear_qkv; gate, up -> linear_fc1), each part sharded over the group on its own.
    """

    mcore: str
    hf: tuple[str, ...]
    split: Split
    layers: tuple[int, ...] | None = None
    """The layers a per-layer map applies to (e.g. only the MoE layers); None means all."""
    experts: int | None = None
    """Routed experts in the model, for maps whose HF names hold ``{e}``: the mcore tensor
    stacks this EP rank's local experts on dim 0 (local expert ``j`` is global expert
    ``ep_rank * experts / ep_size + j``), each one split over ``group`` like a plain tensor."""
    group: Group = "tp"
    """The group ``split`` is over: ``tp`` for dense weights, ``etp`` for routed experts."""
    rows: RowTransform | None = None
    """A reordering of each HF tensor's rows on the way in (and back out)."""
    parts: tuple[int, ...] | None = None
    """Dim-0 block sizes of a single HF tensor made of blocks that are each split over the
    group on their own (Mamba's ``in_proj`` rows ``[z, x, B, C, dt]``): a rank holds its share
    of every block, in order. None: the HF tensor is split as a whole."""

    def __post_init__(self) -> None:
        if self.split in ("row", "replicated") and len(self.hf) != 1:
            raise ValueError(f"{self.mcore}: a {self.split} parameter maps to one HF tensor")
        if self.parts is not None and (self.split != "column" or len(self.hf) != 1):
            raise ValueError(
                f"{self.mcore}: parts splits the blocks of one column-parallel HF tensor; got "
                f"split={self.split!r} with {len(self.hf)} HF tensors"
            )
        has_e = ["{e}" in h for h in self.hf]
        if (self.experts is not None) != all(has_e) or any(has_e) != all(has_e):
            raise ValueError(
                f"{self.mcore}: expert maps set experts and put {{e}} in every HF name; "
                f"got experts={self.experts}, hf={self.hf}"
            )
        if self.layers is not None and not self.per_layer():
            raise ValueError(f"{self.mcore}: only per-layer maps ({{i}} in the name) take layers")

    def per_layer(self) -> bool:
        """Whether the names hold ``{i}``: one tensor per layer."""
        return "{i}" in self.mcore

    def layer_numbers(self, num_layers: int) -> list[int]:
        """The layers this per-layer map covers in a model of ``num_layers`` layers."""
        return list(range(num_layers)) if self.layers is None else list(self.layers)


def _no_sections(hf: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class HFArchitecture:
    """A Hugging Face architecture: config translation both ways and the weight map.

    ``to_config(hf)`` and ``sections_from_hf(hf)`` read a config.json dict into the model's
    ``TransformerConfig`` and the other packages' sections (``{"moe": ...}``; a dense
    architecture has none); ``from_config(cfg, sections)`` writes config.json back;
    ``params(cfg, sections)`` lists the weights. Anything HF can express that mcore cannot is
    refused with ``NotImplementedError`` naming the field.
    """

    name: str
    model_type: str
    to_config: Callable[[dict[str, Any]], TransformerConfig]
    from_config: Callable[[TransformerConfig, Sections], dict[str, Any]]
    params: Callable[[TransformerConfig, Sections], list[ParamMap]]
    sections_from_hf: Callable[[dict[str, Any]], dict[str, Any]] = field(default=_no_sections)


# --- rope -------------------------------------------------------------------------------------


def _yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    def get(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    return get(mscale) / get(mscale_all_dim) if mscale_all_dim else get(mscale)


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``TransformerConfig`` rope fields from a config.json dict."""
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
    original = None
    if kind in ("llama3", "yarn"):
        # transformers falls back to these when rope_parameters does not name the length.
        original = int(
            params.get("original_max_position_embeddings")
            or hf.get("original_max_position_embeddings")
            or hf["max_position_embeddings"]
        )
        out["rope_original_max_position_embeddings"] = original
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style: the extension is the ratio of the two lengths
        factor = hf["max_position_embeddings"] / original if original else 1.0
    out.update(rope_scaling=kind, rope_scaling_factor=float(factor))
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    if kind == "yarn":
        out.update(_yarn_from_hf(params, float(factor)))
    return out


def _yarn_from_hf(params: dict[str, Any], factor: float) -> dict[str, Any]:
    if params.get("truncate", True) is False:
        raise NotImplementedError("rope_parameters.truncate = false (YaRN) is not supported")
    mscale = float(params.get("mscale") or 0.0)
    mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
    if mscale_all_dim and not mscale:
        # transformers then scales cos/sin by the plain YaRN factor but MLA's softmax by
        # mscale_all_dim, a pair mcore's two fields cannot express.
        raise NotImplementedError("rope_parameters.mscale_all_dim without mscale is not supported")
    # transformers uses mscale only together with mscale_all_dim.
    yarn = {"yarn_mscale": mscale if mscale_all_dim else 1.0, "yarn_mscale_all_dim": mscale_all_dim}
    given = params.get("attention_factor")
    ours = _yarn_attention_factor(factor, yarn["yarn_mscale"], mscale_all_dim)
    if given is not None and not math.isclose(float(given), ours, rel_tol=1e-6):
        raise NotImplementedError(
            f"rope_parameters.attention_factor = {given} differs from YaRN's own ({ours:.6g}); "
            "an explicit attention factor is not supported"
        )
    return {
        "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
        "yarn_beta_slow": float(params.get("beta_slow") or 1.0),
        **yarn,
    }


def rope_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    """The ``rope_parameters`` entry of config.json for ``cfg``."""
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
        params.update(beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        if cfg.yarn_mscale_all_dim:
            params.update(mscale=cfg.yarn_mscale, mscale_all_dim=cfg.yarn_mscale_all_dim)
        elif cfg.yarn_mscale != 1.0:
            # Without mscale_all_dim transformers ignores mscale: state the factor itself.
            params["attention_factor"] = _yarn_attention_factor(
                cfg.rope_scaling_factor, cfg.yarn_mscale, 0.0
            )
    return {"rope_parameters": params}


# --- Llama-like config ------------------------------------------------------------------------

_ACTIVATIONS: dict[str, Literal["swiglu", "gelu", "squared_relu"]] = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu": "gelu",
    "relu2": "squared_relu",
}


def llama_like_config(
    hf: dict[str, Any], *, qkv_bias: bool | None, qk_norm: bool
) -> TransformerConfig:
    """The ``TransformerConfig`` of a Llama-like config.json (RMSNorm, GQA, gated MLP).

    ``qkv_bias=None`` reads the biases from ``attention_bias``/``mlp_bias``; a bool fixes the
    qkv bias and rules out the others (Qwen2).
    """
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
        **rope_from_hf(hf),
    )


def llama_like_hf(cfg: TransformerConfig, model_type: str, arch: str) -> dict[str, Any]:
    """The config.json fields a Llama-like architecture shares, for ``cfg``."""
    if cfg.normalization != "RMSNorm" or cfg.activation != "swiglu":
        raise NotImplementedError(f"{arch} needs RMSNorm and swiglu")
    if cfg.multi_latent_attention:
        raise NotImplementedError(f"{arch} has no multi-latent attention (DeepSeek-V3 has)")
    if cfg.hybrid_override_pattern:
        raise NotImplementedError(f"{arch} has no hybrid layer pattern")
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
        **rope_to_hf(cfg),
    }


def require_dense_mlps(cfg: TransformerConfig, sections: Sections | None, arch: str) -> None:
    """Raise unless every layer of the model has a dense MLP (no section picked another)."""
    from mcore.models.layer import gpt_layer_spec

    for i in range(cfg.num_layers):
        mlp = gpt_layer_spec(cfg, i, sections).mlp
        if mlp != "mlp":
            raise NotImplementedError(
                f"{arch} has dense MLPs only, but layer {i} has a {mlp!r} MLP; save it as an "
                "architecture that has them (e.g. MixtralForCausalLM, with mcore-moe)"
            )


# --- weight maps ------------------------------------------------------------------------------


def outer_params(cfg: TransformerConfig) -> list[ParamMap]:
    """Embedding, final norm and (untied) output layer."""
    params = [
        ParamMap("embedding.weight", ("model.embed_tokens.weight",), "vocab"),
        ParamMap("final_layernorm.weight", ("model.norm.weight",), "replicated"),
    ]
    if cfg.untie_embeddings_and_output_weights:
        params.append(ParamMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return params


def layer_norm_params() -> list[ParamMap]:
    """The two pre-norms of every layer."""
    return [
        ParamMap(
            "layers.{i}.input_layernorm.weight",
            ("model.layers.{i}.input_layernorm.weight",),
            "replicated",
        ),
        ParamMap(
            "layers.{i}.pre_mlp_layernorm.weight",
            ("model.layers.{i}.post_attention_layernorm.weight",),
            "replicated",
        ),
    ]


def attention_params(
    cfg: TransformerConfig, prefix: str = "model.layers.{i}.self_attn"
) -> list[ParamMap]:
    """GQA attention (``q/k/v/o_proj``, optional biases and ``q/k_norm``) under HF ``prefix``."""
    attn = prefix
    params = [
        ParamMap(
            "layers.{i}.self_attention.linear_qkv.weight",
            (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
            "column",
        ),
        ParamMap("layers.{i}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",), "row"),
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
        params.append(
            ParamMap(
                "layers.{i}.self_attention.linear_proj.bias", (f"{attn}.o_proj.bias",), "replicated"
            )
        )
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
    return params


def gated_mlp_params(
    mcore: str,
    hf: str,
    *,
    names: tuple[str | None, str, str] = ("gate_proj", "up_proj", "down_proj"),
    bias: bool = False,
    layers: tuple[int, ...] | None = None,
) -> list[ParamMap]:
    """A TP-split MLP: mcore ``{mcore}.linear_fc1/fc2`` from HF ``{hf}.{gate,up,down}``; a
    ``None`` gate name maps a non-gated MLP (fc1 is the up projection alone)."""
    gate, up, down = names
    fc1 = (up,) if gate is None else (gate, up)
    params = [
        ParamMap(
            f"{mcore}.linear_fc1.weight",
            tuple(f"{hf}.{name}.weight" for name in fc1),
            "column",
            layers=layers,
        ),
        ParamMap(f"{mcore}.linear_fc2.weight", (f"{hf}.{down}.weight",), "row", layers=layers),
    ]
    if bias:
        params += [
            ParamMap(
                f"{mcore}.linear_fc1.bias",
                tuple(f"{hf}.{name}.bias" for name in fc1),
                "column",
                layers=layers,
            ),
            ParamMap(
                f"{mcore}.linear_fc2.bias", (f"{hf}.{down}.bias",), "replicated", layers=layers
            ),
        ]
    return params


def llama_like_params(
    cfg: TransformerConfig,
    sections: Sections | None = None,
    *,
    mlp_layers: tuple[int, ...] | None = None,
) -> list[ParamMap]:
    """Every weight of a Llama-like model; ``mlp_layers`` limits the dense MLPs to those layers
    (the others belong to an MoE architecture's own maps)."""
    return [
        *outer_params(cfg),
        *layer_norm_params(),
        *attention_params(cfg),
        *gated_mlp_params(
            "layers.{i}.mlp", "model.layers.{i}.mlp", bias=cfg.add_bias_linear, layers=mlp_layers
        ),
    ]


def _family(name: str, model_type: str, *, qkv_bias: bool | None, qk_norm: bool) -> HFArchitecture:
    def to_config(hf: dict[str, Any]) -> TransformerConfig:
        return llama_like_config(hf, qkv_bias=qkv_bias, qk_norm=qk_norm)

    def from_config(cfg: TransformerConfig, sections: Sections | None = None) -> dict[str, Any]:
        out = llama_like_hf(cfg, model_type, name)
        require_dense_mlps(cfg, sections, name)
        if qkv_bias is None:
            out.update(attention_bias=cfg.add_qkv_bias, mlp_bias=cfg.add_bias_linear)
        elif cfg.add_qkv_bias != qkv_bias or cfg.add_bias_linear:
            raise NotImplementedError(f"{name} has qkv bias={qkv_bias} and no other biases")
        if cfg.qk_layernorm != qk_norm:
            raise NotImplementedError(f"{name} has qk_layernorm={qk_norm}")
        return out

    return HFArchitecture(name, model_type, to_config, from_config, llama_like_params)


LLAMA = _family("LlamaForCausalLM", "llama", qkv_bias=None, qk_norm=False)
MISTRAL = _family("MistralForCausalLM", "mistral", qkv_bias=False, qk_norm=False)
QWEN2 = _family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False)
QWEN3 = _family("Qwen3ForCausalLM", "qwen3", qkv_bias=None, qk_norm=True)
