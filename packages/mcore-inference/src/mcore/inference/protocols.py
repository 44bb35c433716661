"""The interfaces others talk to mcore-inference through.

- :class:`InferenceEngine`: an engine stepped in the caller's thread. megatron-rl drives one
  (its rollouts add requests and step it, refits write new weights into it between steps),
  and :class:`~mcore.inference.async_engine.AsyncInferenceEngine` serves one to asyncio.
  :class:`~mcore.inference.engine.DynamicInferenceEngine` is the engine, with its replica
  (tensor/pipeline-parallel) and expert-parallel variants.
- :class:`ServingBackend`: what ``mcore serve``'s HTTP server
  (:class:`~mcore.inference.server.app.OpenAIServer`) sends requests to: an
  ``AsyncInferenceEngine`` in process, or the data-parallel coordinator's
  :class:`~mcore.inference.coordinator.client.InferenceClient`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from mcore.inference.errors import RequestId
    from mcore.inference.request import RequestDelta, RequestOutput
    from mcore.inference.sampling import SamplingParams
    from mcore.inference.streams import RequestStream
    from mcore.inference.tokenizer import TextTokenizer

__all__ = ["InferenceEngine", "ServingBackend"]


@runtime_checkable
class InferenceEngine(Protocol):
    """An engine with continuous batching, stepped by its caller.

    Requests are added at any time and advance one token (or prefill chunk) per :meth:`step`,
    which returns each request's new tokens. Between steps the caller may :meth:`suspend` the
    engine (its KV cache is freed, e.g. for training), :meth:`resume` it and refit its weights
    (:meth:`update_weights`).
    """

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """Encodes text prompts and decodes outputs; ``None``: token ids only."""
        ...

    @property
    def model(self) -> torch.nn.Module:
        """The served model (its ``state_dict`` names what a refit must provide)."""
        ...

    def add_request(
        self,
        prompt: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> RequestId:
        """Queue a request; returns its id. Raises at once for a request it refuses."""
        ...

    def step(self) -> list[RequestDelta]:
        """Run one step; the new tokens of every request that advanced (finished ones
        included, ``finished`` set)."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion (stepping the engine); their outputs in order."""
        ...

    def suspend(self, mode: str | None = None) -> None:
        """Free the engine's KV cache between steps; requests in flight resume later."""
        ...

    def resume(self) -> None:
        """Undo :meth:`suspend`."""
        ...

    def update_weights(
        self, weights: torch.nn.Module | Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> None:
        """Copy new weights (a model or some of its ``state_dict``, with ``strict=False``)
        into the served model in place."""
        ...


@runtime_checkable
class ServingBackend(Protocol):
    """What the HTTP server sends requests to. A backend may also offer ``async health() ->
    dict`` (``{"status": "ok", ...}``), which ``GET /health`` reports."""

    async def add_request(
        self,
        prompt: Sequence[int],
        sampling_params: SamplingParams | None = None,
        /,
        *,
        request_id: RequestId | None = None,
    ) -> RequestStream:
        """Submit a request; returns the stream of its deltas. Raises
        ``InvalidRequestError`` / ``ContextOverflowError`` at once for one it refuses."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Counters for ``GET /metrics`` (requests running and waiting, tokens, ...)."""
        ...


if TYPE_CHECKING:
    # The built-in implementations conform: the type checker verifies these assignments.
    from mcore.inference.async_engine import AsyncInferenceEngine
    from mcore.inference.coordinator.client import InferenceClient
    from mcore.inference.engine import DynamicInferenceEngine

    _ENGINES: list[type[InferenceEngine]] = [DynamicInferenceEngine]
    _BACKENDS: list[type[ServingBackend]] = [AsyncInferenceEngine, InferenceClient]
