"""mcore-inference's interfaces are typed protocols: the engine megatron-rl drives is an
:class:`~mcore.inference.protocols.InferenceEngine`, and both backends ``mcore serve``'s HTTP
server runs over are :class:`~mcore.inference.protocols.ServingBackend` s."""

from __future__ import annotations

from mcore.inference import AsyncInferenceEngine, InferenceClient
from mcore.inference.protocols import InferenceEngine, ServingBackend


def test_the_engine_and_the_serving_backends_satisfy_their_protocols(llama_engine_factory):
    engine = llama_engine_factory()
    assert isinstance(engine, InferenceEngine)
    assert isinstance(AsyncInferenceEngine(engine), ServingBackend)
    assert isinstance(InferenceClient("tcp://127.0.0.1:1"), ServingBackend)  # not connected
