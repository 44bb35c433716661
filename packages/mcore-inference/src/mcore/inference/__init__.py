"""mcore.inference: a dynamic batching engine, a data-parallel coordinator and an HTTP server."""

from mcore.inference.config import InferenceConfig

__all__ = ["InferenceConfig"]
