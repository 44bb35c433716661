"""``TransformerConfig``: the architecture of a transformer, and the ``[model]`` config section.

Field names follow Megatron-Core's ``TransformerConfig`` and arguments, so ``--model.num-layers``
is Megatron's ``--num-layers``. Derived sizes (head dim, MLP width, key/value groups) are read
through properties, so an unset field never needs to be filled in by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core import Config, ConfigErrors, component
from mcore.models.hybrid import HybridPattern, PatternError, parse_hybrid_pattern


@dataclass(kw_only=True)
class TransformerConfig:
    """Model architecture: the builder by name and the transformer's dimensions."""

    name: str = component("model", "gpt")
    """Model builder by registry name."""
    num_layers: int = field(default=4, metadata={"megatron": "--num-layers"})
    """Transformer layers."""
    hidden_size: int = field(default=256, metadata={"megatron": "--hidden-size"})
    """Width of the residual stream."""
    num_attention_heads: int = field(default=4, metadata={"megatron": "--num-attention-heads"})
    """Query heads per attention layer."""
    num_query_groups: int | None = field(default=None, metadata={"megatron": "--num-query-groups"})
    """Key/value heads for grouped-query attention; unset means num_attention_heads (MHA)."""
    kv_channels: int | None = field(default=None, metadata={"megatron": "--kv-channels"})
    """Per-head dimension; unset means hidden_size / num_attention_heads."""
    ffn_hidden_size: int | None = field(default=None, metadata={"megatron": "--ffn-hidden-size"})
    """MLP width; unset means 4 x hidden_size."""
    vocab_size: int | None = field(default=None, metadata={"megatron": "--vocab-size"})
    """Vocabulary size; unset means the tokenizer's."""
    num_layers_in_first_pipeline_stage: int | None = field(
        default=None, metadata={"megatron": "--decoder-first-pipeline-num-layers"}
    )
    """Layers on the first pipeline stage; the stages between the ends split the rest equally.
    Unset: every stage holds num_layers / pipeline_model_parallel_size."""
    num_layers_in_last_pipeline_stage: int | None = field(
        default=None, metadata={"megatron": "--decoder-last-pipeline-num-layers"}
    )
    """Layers on the last pipeline stage (see num_layers_in_first_pipeline_stage)."""
    max_position_embeddings: int = field(
        default=4096, metadata={"megatron": "--max-position-embeddings"}
    )
    """Longest sequence the position embedding supports."""
    normalization: str = component("norm", "RMSNorm", metadata={"megatron": "--normalization"})
    """Normalisation layer by registry name (RMSNorm, LayerNorm)."""
    norm_epsilon: float = field(default=1e-5, metadata={"megatron": "--norm-epsilon"})
    """Epsilon of the normalisation layers."""
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    """MLP activation; swiglu is gated (two input projections)."""
    add_bias_linear: bool = False
    """Bias in the MLP and attention output projections."""
    add_qkv_bias: bool = field(default=False, metadata={"megatron": "--add-qkv-bias"})
    """Bias in the query/key/value projection (Qwen2 style)."""
    qk_layernorm: bool = field(default=False, metadata={"megatron": "--qk-layernorm"})
    """Normalise queries and keys per head before rotary (Qwen3 style)."""
    attention_output_gate: bool = False
    """Gate each head's attention output by ``sigmoid`` of a per-head projection of the input
    (Qwen3-Next's gated attention); the query projection then also produces the gate."""
    layernorm_zero_centered_gamma: bool = field(
        default=False, metadata={"megatron": "--apply-layernorm-1p"}
    )
    """Norm weights are stored as ``gamma - 1`` (zero at init), so weight decay pulls the
    scale to 1 rather than 0 (Qwen3-Next's norms)."""
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = field(
        default="rope", metadata={"megatron": "--position-embedding-type"}
    )
    """Position encoding."""
    rotary_percent: float = field(default=1.0, metadata={"megatron": "--rotary-percent"})
    """Share of each head's channels that rotary rotates (the leading ones; Qwen3-Next 0.25)."""
    rotary_base: float = field(default=10000.0, metadata={"megatron": "--rotary-base"})
    """Base of the rotary embedding frequencies."""
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    """Rotary frequency scaling for long context."""
    rope_scaling_factor: float = field(default=1.0, metadata={"megatron": "--rope-scaling-factor"})
    """Context extension factor of the rope scaling."""
    rope_original_max_position_embeddings: int | None = None
    """Context length the model was pre-trained at (llama3, yarn)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_len / this are not scaled."""
    yarn_beta_fast: float = 32.0
    """YaRN: rotations above which frequencies are kept (extrapolated)."""
    yarn_beta_slow: float = 1.0
    """YaRN: rotations below which frequencies are fully interpolated."""
    yarn_mscale: float = field(default=1.0, metadata={"megatron": "--mscale"})
    """YaRN attention temperature coefficient."""
    yarn_mscale_all_dim: float = field(default=0.0, metadata={"megatron": "--mscale-all-dim"})
    """YaRN: mscale of the denominator (DeepSeek style); 0 uses the plain YaRN factor."""
    attention_backend: str = component("attention_backend", "sdpa")
    """Core attention kernel by registry name (sdpa; te with mcore-models[te])."""
    multi_latent_attention: bool = field(
        default=False, metadata={"megatron": "--multi-latent-attention"}
    )
    """DeepSeek-style multi-latent attention (low-rank q and kv, decoupled rope)."""
    q_lora_rank: int | None = field(default=None, metadata={"megatron": "--q-lora-rank"})
    """MLA: rank of the query down-projection; unset projects queries directly."""
    kv_lora_rank: int = field(default=512, metadata={"megatron": "--kv-lora-rank"})
    """MLA: rank of the compressed key/value latent."""
    qk_head_dim: int = field(default=128, metadata={"megatron": "--qk-head-dim"})
    """MLA: per-head query/key dimension without rope."""
    qk_pos_emb_head_dim: int = field(default=64, metadata={"megatron": "--qk-pos-emb-head-dim"})
    """MLA: per-head query/key dimension that carries rope (shared key across heads)."""
    v_head_dim: int = field(default=128, metadata={"megatron": "--v-head-dim"})
    """MLA: per-head value dimension."""
    untie_embeddings_and_output_weights: bool = field(
        default=False, metadata={"megatron": "--untie-embeddings-and-output-weights"}
    )
    """Give the output layer its own weights instead of sharing the input embedding."""
    cross_entropy_loss_fusion: bool = field(
        default=False, metadata={"megatron": "--cross-entropy-loss-fusion"}
    )
    """Compute the output layer and the cross-entropy together over token chunks, never holding
    the whole micro-batch's logits (Megatron's --cross-entropy-loss-fusion): same loss and
    gradients, one more output-layer matmul in backward (it recomputes each chunk's logits)."""
    cross_entropy_chunk_tokens: int = 4096
    """Tokens per chunk of the fused cross-entropy: it holds chunk x vocab / tp fp32 logits
    at a time (cross_entropy_loss_fusion only)."""
    init_method_std: float = field(default=0.02, metadata={"megatron": "--init-method-std"})
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = field(default=0.0, metadata={"megatron": "--hidden-dropout"})
    """Dropout after attention and MLP."""
    attention_dropout: float = field(default=0.0, metadata={"megatron": "--attention-dropout"})
    """Dropout on attention probabilities."""
    recompute_granularity: Literal["full", "selective"] | None = field(
        default=None, metadata={"megatron": "--recompute-granularity"}
    )
    """Activation recompute: whole layers, the core attention only, or none."""
    hybrid_override_pattern: str | None = field(
        default=None,
        metadata={"megatron": "--hybrid-override-pattern", "aliases": ("hybrid_layer_pattern",)},
    )
    """One symbol per layer from the ``layer`` registry: ``*`` attention, ``-`` MLP, ``E`` MoE
    (mcore-moe), ``M`` Mamba-2 and ``G`` gated delta net (mcore-ssm); ``|`` ends a pipeline
    stage, each ``/`` starts a multi-token-prediction block (Megatron's grammar, also accepted
    as hybrid_layer_pattern). Unset builds GPT layers (attention and MLP each)."""
    mtp_num_layers: int | None = field(default=None, metadata={"megatron": "--mtp-num-layers"})
    """Multi-token-prediction depths (DeepSeek-V3's MTP) after the main stack, on the last
    pipeline stage: depth k predicts the token k + 1 places ahead. Each is one layer with the
    last main layer's spec, or one '/' block of hybrid_override_pattern. Unset: as many as the
    pattern has '/' blocks (none without a pattern)."""
    mtp_loss_scaling_factor: float | None = field(
        default=None, metadata={"megatron": "--mtp-loss-scaling-factor"}
    )
    """Weight of the MTP loss (the mean over depths) in the training loss; unset means 0.1.
    Only valid with MTP depths."""

    # --- derived sizes ---------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def gated_mlp(self) -> bool:
        return self.activation == "swiglu"

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary rotates (head_dim x rotary_percent)."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def layer_pattern(self) -> HybridPattern | None:
        """The parsed ``hybrid_override_pattern`` (None without one)."""
        pattern = self.hybrid_override_pattern
        return None if pattern is None else parse_hybrid_pattern(pattern)

    @property
    def mtp_depth(self) -> int:
        """Multi-token-prediction depths: mtp_num_layers, else the pattern's '/' blocks."""
        if self.mtp_num_layers is not None:
            return self.mtp_num_layers
        try:
            pattern = self.layer_pattern
        except PatternError:  # reported by validate()
            return 0
        return 0 if pattern is None else len(pattern.mtp_layers)

    @property
    def mtp_loss_factor(self) -> float:
        """mtp_loss_scaling_factor with its default filled in."""
        factor = self.mtp_loss_scaling_factor
        return 0.1 if factor is None else factor

    @property
    def pipeline_stage_layer_counts(self) -> tuple[int, ...] | None:
        """Layers per pipeline segment that the pattern's ``|`` fix (None: no ``|``). They
        apply under pipeline parallelism; a single stage holds every layer."""
        pattern = self.layer_pattern
        return None if pattern is None else pattern.stage_layer_counts

    def validate(self, errors: ConfigErrors) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                errors.add(name, f"must be >= 1, got {getattr(self, name)}")
        if self.cross_entropy_chunk_tokens < 1:
            errors.add(
                "cross_entropy_chunk_tokens", f"must be >= 1, got {self.cross_entropy_chunk_tokens}"
            )
        for name in ("num_query_groups", "kv_channels", "ffn_hidden_size", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.add(name, f"must be >= 1, got {value}")
        heads, groups = self.num_attention_heads, self.num_query_groups
        if self.kv_channels is None and heads > 0 and self.hidden_size % heads:
            errors.add(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads ({heads}); "
                "set kv_channels to use another head size",
            )
        if groups is not None and groups > 0 and heads % groups:
            errors.add(
                "num_query_groups",
                f"num_attention_heads ({heads}) must be a multiple of num_query_groups ({groups})",
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.add(name, f"must lie in [0, 1), got {getattr(self, name)}")
        if (
            self.rope_scaling in ("llama3", "yarn")
            and self.rope_original_max_position_embeddings is None
        ):
            errors.add(
                "rope_original_max_position_embeddings",
                f"is required with rope_scaling = {self.rope_scaling!r}",
            )
        if self.rope_scaling != "none" and self.rope_scaling_factor <= 0:
            errors.add("rope_scaling_factor", f"must be > 0, got {self.rope_scaling_factor}")
        if self.hybrid_override_pattern is not None:
            self._validate_pattern(errors)
        if self.mtp_depth and self.position_embedding_type == "learned_absolute":
            errors.add(
                "mtp_num_layers",
                "multi-token prediction needs position_embedding_type 'rope' or 'none' "
                "(its depths would need the learned position table on the last stage)",
            )
        if self.mtp_num_layers is not None and self.mtp_num_layers < 0:
            errors.add("mtp_num_layers", f"must be >= 0, got {self.mtp_num_layers}")
        factor = self.mtp_loss_scaling_factor
        if factor is not None:
            if factor < 0:
                errors.add("mtp_loss_scaling_factor", f"must be >= 0, got {factor}")
            elif self.mtp_num_layers == 0 or (
                self.mtp_num_layers is None and not self._pattern_has_mtp()
            ):
                errors.add(
                    "mtp_loss_scaling_factor",
                    f"is set ({factor}) but the model has no multi-token-prediction layers: "
                    "set mtp_num_layers (or add '/' blocks to hybrid_override_pattern)",
                )
        if not 0.0 < self.rotary_percent <= 1.0:
            errors.add("rotary_percent", f"must lie in (0, 1], got {self.rotary_percent}")
        elif self.position_embedding_type == "rope" and int(self.rotary_dim) % 2:
            errors.add(
                "rotary_percent",
                f"rotates {self.head_dim * self.rotary_percent:g} channels of head_dim "
                f"{self.head_dim}; rotary needs an even whole number",
            )
        if self.attention_output_gate and self.multi_latent_attention:
            errors.add("attention_output_gate", "is not supported with multi_latent_attention")
        if self.multi_latent_attention and self.position_embedding_type != "rope":
            errors.add("multi_latent_attention", "needs position_embedding_type = 'rope'")

    def _pattern_has_mtp(self) -> bool:
        try:
            pattern = self.layer_pattern
        except PatternError:
            return False
        return pattern is not None and bool(pattern.mtp_layers)

    def _validate_pattern(self, errors: ConfigErrors) -> None:
        try:
            pattern = parse_hybrid_pattern(self.hybrid_override_pattern or "")  # set: see validate
        except PatternError as error:
            errors.add("hybrid_override_pattern", str(error))
            return
        if len(pattern.layers) != self.num_layers:
            errors.add(
                "hybrid_override_pattern",
                f"has {len(pattern.layers)} layer symbols but num_layers is {self.num_layers}; "
                f"give one symbol per layer or set num_layers = {len(pattern.layers)}",
            )
        depths = self.mtp_num_layers
        if pattern.mtp_layers and depths is not None and depths != len(pattern.mtp_layers):
            errors.add(
                "mtp_num_layers",
                f"is {depths}, but hybrid_override_pattern has {len(pattern.mtp_layers)} "
                "multi-token-prediction block(s) after '/': give one block per depth",
            )
        ends = (self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage)
        if pattern.stage_layer_counts is not None and any(n is not None for n in ends):
            errors.add(
                "hybrid_override_pattern",
                "splits pipeline stages with '|' and num_layers_in_first/last_pipeline_stage "
                "are set too: use one of the two",
            )

    def checked(self) -> TransformerConfig:
        """Raise ``ConfigError`` if the config is invalid; returns ``self`` for chaining."""
        from mcore.core import ConfigError

        errors = ConfigErrors("model.")
        self.validate(errors)
        if errors:
            raise ConfigError(errors.messages)
        return self


def validate_against_parallel(config: Config, errors: ConfigErrors) -> None:
    """Heads and key/value groups must split evenly over tensor-parallel ranks."""
    if "parallel" not in config or "model" not in config:
        return
    tp = config.parallel.tensor_model_parallel_size
    model = config.model
    if model.num_attention_heads % tp:
        errors.add(
            "model.num_attention_heads",
            f"{model.num_attention_heads} heads do not divide over "
            f"parallel.tensor_model_parallel_size={tp}",
        )
    _validate_stage_splits(config, errors)
    groups = model.num_query_groups
    if groups is not None and groups % tp:
        errors.add(
            "model.num_query_groups",
            f"{groups} key/value groups do not divide over "
            f"parallel.tensor_model_parallel_size={tp}",
        )


def _validate_stage_splits(config: Config, errors: ConfigErrors) -> None:
    """A pattern's ``|`` segments must be one per (virtual) pipeline stage (without pipeline
    parallelism they are ignored: one stage holds every layer)."""
    try:
        counts = config.model.pipeline_stage_layer_counts
    except PatternError:
        return  # reported by the model section itself
    if counts is None:
        return
    pp = config.parallel.pipeline_model_parallel_size
    vp = getattr(config.parallel, "virtual_pipeline_model_parallel_size", None) or 1
    if pp > 1 and len(counts) != pp * vp:
        stages = f"{pp} pipeline stages" + (f" x {vp} virtual stages" if vp > 1 else "")
        errors.add(
            "model.hybrid_override_pattern",
            f"has {len(counts)} '|'-separated segments but the layout has {stages}: give one "
            f"segment per stage (or drop the '|' to split the layers evenly)",
        )
