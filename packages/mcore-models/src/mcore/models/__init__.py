"""mcore.models: transformer layers assembled from specs, GPT models and Hugging Face interop."""

from mcore.models.config import TransformerConfig
from mcore.models.context import ModelContext
from mcore.models.gpt import GPTModel
from mcore.models.layer import LayerSpec, TransformerLayer, gpt_layer_spec

__all__ = [
    "GPTModel",
    "LayerSpec",
    "ModelContext",
    "TransformerConfig",
    "TransformerLayer",
    "gpt_layer_spec",
]
