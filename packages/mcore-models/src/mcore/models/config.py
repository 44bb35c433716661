"""The ``[model]`` config section: which model to build and its shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcore.core import Config, ConfigErrors, component


@dataclass(kw_only=True)
class ModelConfig:
    """Model architecture: the builder by name and the transformer's dimensions."""

    name: str = component("model", "gpt")
    """Model builder by registry name."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Query heads per attention layer."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; unset means num_attention_heads (MHA)."""
    kv_channels: int | None = None
    """Per-head dimension; unset means hidden_size / num_attention_heads."""
    ffn_hidden_size: int | None = None
    """MLP width; unset means 4 x hidden_size."""
    vocab_size: int | None = None
    """Vocabulary size; unset means the tokenizer's."""
    max_position_embeddings: int = 4096
    """Longest sequence the position embedding supports."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""
    activation: Literal["swiglu", "gelu", "squared_relu"] = "swiglu"
    """MLP activation."""
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    """Position encoding."""
    rotary_base: float = 10000.0
    """Base of the rotary embedding frequencies."""
    add_qkv_bias: bool = False
    """Bias in the query/key/value projection (Qwen2 style)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head (Qwen3 style)."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weights instead of sharing the input embedding."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recompute: full layers, selected parts, or none."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                errors.add(name, f"must be >= 1, got {getattr(self, name)}")
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
    groups = model.num_query_groups
    if groups is not None and groups % tp:
        errors.add(
            "model.num_query_groups",
            f"{groups} key/value groups do not divide over "
            f"parallel.tensor_model_parallel_size={tp}",
        )
