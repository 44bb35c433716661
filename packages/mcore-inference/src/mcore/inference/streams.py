"""``RequestStream``: the deltas of one accepted request, as an async iterator.

Front ends first submit (``stream = await backend.add_request(...)``, which raises at once if
the request is refused), then iterate: each item is a
:class:`~mcore.inference.request.RequestDelta` (the tokens, logprobs and text new since the
previous one), the last with ``finished`` set. The stream joins them as they pass, so
:meth:`RequestStream.output` (or :meth:`RequestStream.final`) gives the complete
:class:`~mcore.inference.request.RequestOutput` without a second pass. Closing a stream before
the end (``await stream.aclose()``, or leaving ``async with stream``) aborts the request.
Both the in-process :class:`~mcore.inference.async_engine.AsyncInferenceEngine` and the
coordinator's :class:`~mcore.inference.coordinator.client.InferenceClient` hand these out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mcore.inference.errors import RequestId
from mcore.inference.request import OutputCollector, RequestDelta, RequestOutput


class RequestStream:
    """Deltas of one request, read from a queue that its backend fills."""

    def __init__(
        self,
        request_id: RequestId,
        queue: asyncio.Queue,
        on_close: Callable[[RequestId, bool], Any],
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        self.request_id = request_id
        self._queue = queue
        self._on_close = on_close
        self._collector = OutputCollector(request_id, prompt_token_ids)
        self._finished = False
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._finished

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self._finished or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._collector.add(item)
        if item.finished:
            self._finished = True
        return item

    def output(self) -> RequestOutput:
        """Everything received so far, as one output (a copy: its cost grows with the length,
        so call it at the end rather than after every delta)."""
        return self._collector.output()

    async def final(self) -> RequestOutput:
        """Read to the end; the complete output."""
        async for _ in self:
            pass
        await self.aclose()
        return self.output()

    async def aclose(self) -> None:
        """Stop listening; aborts the request if it had not finished."""
        if self._closed:
            return
        self._closed = True
        result = self._on_close(self.request_id, self._finished)
        if asyncio.iscoroutine(result):
            await result

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
