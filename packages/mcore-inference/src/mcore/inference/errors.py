"""Errors of the inference engine, coordinator and server.

All are :class:`~mcore.core.McoreError` (the CLI prints them without a traceback). Errors about
one request carry its ``request_id`` and, where one field is at fault, the ``field`` name, so a
front end can answer with a 4xx naming it.
"""

from __future__ import annotations

from typing import Any

from mcore.core import McoreError

RequestId = int | str
"""Requests are named by an int or a string, unique among the engine's live requests."""


class InferenceError(McoreError):
    """Base class of this package's errors."""


class InvalidRequestError(InferenceError, ValueError):
    """A request (or its sampling parameters) is malformed; nothing was queued."""

    def __init__(
        self, message: str, *, field: str | None = None, request_id: RequestId | None = None
    ) -> None:
        prefix = f"request {request_id!r}: " if request_id is not None else ""
        super().__init__(prefix + message)
        self.field = field
        self.request_id = request_id


class ContextOverflowError(InvalidRequestError):
    """A request can never fit: its prompt (plus the tokens it asks for) exceeds the longest
    sequence the engine runs or the whole KV cache."""

    def __init__(
        self, message: str, *, request_id: RequestId | None, tokens: int, limit: int
    ) -> None:
        super().__init__(message, field="prompt", request_id=request_id)
        self.tokens = tokens
        self.limit = limit


class EngineStateError(InferenceError, RuntimeError):
    """The engine cannot do this now (e.g. step while suspended)."""


class EngineLostError(EngineStateError):
    """The engine can never step again (a model replica lost one of its ranks): whoever serves
    it stops, and its requests fail."""


class RequestFailedError(InferenceError):
    """A request was accepted but could not complete (its engine rank died, the coordinator
    stopped, ...); the message says why."""

    def __init__(self, message: str, *, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def error_payload(exc: BaseException) -> dict[str, Any]:
    """A plain description of ``exc`` for messages between processes."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "field": getattr(exc, "field", None),
    }
