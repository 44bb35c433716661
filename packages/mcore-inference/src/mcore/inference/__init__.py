"""mcore.inference: a dynamic batching engine, a data-parallel coordinator and an HTTP server.

Names resolve on first use, so loading this package's plugin (``mcore plugins``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports
from mcore.inference.config import InferenceConfig

_EXPORTS = {
    "AsyncInferenceEngine": "mcore.inference.async_engine",
    "ContextOverflowError": "mcore.inference.errors",
    "DynamicInferenceContext": "mcore.inference.context",
    "DynamicInferenceEngine": "mcore.inference.engine",
    "ExpertParallelEngine": "mcore.inference.expert_parallel",
    "InferenceClient": "mcore.inference.coordinator.client",
    "InferenceCoordinator": "mcore.inference.coordinator.coordinator",
    "InvalidRequestError": "mcore.inference.errors",
    "RequestFailedError": "mcore.inference.errors",
    "ReplicaEngine": "mcore.inference.replica",
    "OutputCollector": "mcore.inference.request",
    "RequestDelta": "mcore.inference.request",
    "RequestOutput": "mcore.inference.request",
    "SamplingParams": "mcore.inference.sampling",
    "load_model": "mcore.inference.loading",
}

__all__ = [
    "AsyncInferenceEngine",
    "ContextOverflowError",
    "DynamicInferenceContext",
    "DynamicInferenceEngine",
    "ExpertParallelEngine",
    "InferenceClient",
    "InferenceConfig",
    "InferenceCoordinator",
    "InvalidRequestError",
    "OutputCollector",
    "ReplicaEngine",
    "RequestDelta",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
    "load_model",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mcore.inference.async_engine import AsyncInferenceEngine
    from mcore.inference.context import DynamicInferenceContext
    from mcore.inference.coordinator.client import InferenceClient
    from mcore.inference.coordinator.coordinator import InferenceCoordinator
    from mcore.inference.engine import DynamicInferenceEngine
    from mcore.inference.errors import ContextOverflowError, InvalidRequestError, RequestFailedError
    from mcore.inference.expert_parallel import ExpertParallelEngine
    from mcore.inference.loading import load_model
    from mcore.inference.replica import ReplicaEngine
    from mcore.inference.request import OutputCollector, RequestDelta, RequestOutput
    from mcore.inference.sampling import SamplingParams
