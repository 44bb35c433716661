"""mcore.models: transformer layers assembled from specs, GPT models and Hugging Face interop."""

from mcore.models.config import ModelConfig

__all__ = ["ModelConfig"]
