"""``AsyncInferenceEngine``: an engine stepping in its own thread, driven from asyncio.

The engine is touched by one thread only: requests, aborts and control calls are queued as
commands that the stepping thread runs between steps, and each step's deltas travel back to
per-request asyncio queues through one ``call_soon_threadsafe``. The model's kernels release
the GIL, so the event loop (an HTTP server, a coordinator connection, heartbeats) keeps
running during a step.

    async with AsyncInferenceEngine(engine) as served:
        async for delta in served.generate(prompt_ids, SamplingParams(max_tokens=32)):
            print(delta.text, end="")                       # what each step added
        stream = await served.add_request(prompt_ids, params)
        output = await stream.final()                       # the whole RequestOutput

Streams carry the engine's deltas as they are (see :mod:`mcore.inference.streams`), so the
work per step stays the same however long a request grows.

Both this class and the coordinator's :class:`~mcore.inference.coordinator.client.InferenceClient`
implement the same small front-end interface (``add_request`` returning a
:class:`~mcore.inference.streams.RequestStream`, ``generate``, ``abort``, ``pause``,
``unpause``, ``suspend``, ``resume``, ``stats``), so the HTTP server runs over either.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from mcore.inference.engine import DynamicInferenceEngine
from mcore.inference.errors import (
    EngineLostError,
    EngineStateError,
    InvalidRequestError,
    RequestFailedError,
    RequestId,
)
from mcore.inference.request import RequestDelta
from mcore.inference.sampling import SamplingParams
from mcore.inference.streams import RequestStream

log = logging.getLogger(__name__)


class AsyncInferenceEngine:
    """Serves a :class:`DynamicInferenceEngine` to coroutines of one event loop."""

    def __init__(self, engine: DynamicInferenceEngine, *, idle_poll_s: float | None = None) -> None:
        self.engine = engine
        self.idle_poll_s = engine.idle_poll_s if idle_poll_s is None else idle_poll_s
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future | None]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._streams: dict[RequestId, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False
        self.lost: EngineLostError | None = None
        """Why the stepping thread stopped on its own (a model replica lost a rank)."""
        self._ids = itertools.count()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> AsyncInferenceEngine:
        """Start the stepping thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mcore-engine", daemon=True)
        self._thread.start()
        return self

    async def shutdown(self) -> None:
        """Stop the thread after its current step; streams still open end with an error."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None
        for rid, stream in list(self._streams.items()):
            stream.put_nowait(RequestFailedError("the engine was shut down", request_id=rid))

    async def __aenter__(self) -> AsyncInferenceEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests -----------------------------------------------------------------------------

    async def add_request(
        self,
        prompt: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> RequestStream:
        """Submit a request; returns the stream of its deltas. Raises ``InvalidRequestError``
        / ``ContextOverflowError`` at once when the engine refuses it."""
        if not self.running:
            raise EngineStateError("the async engine is not started: await start() first")
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        if rid in self._streams:
            raise InvalidRequestError("a live request already has this id", request_id=rid)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = stream
        try:
            await self.call(
                lambda: self.engine.add_request(prompt, sampling_params, request_id=rid)
            )
        except BaseException:
            self._streams.pop(rid, None)
            raise
        return RequestStream(rid, stream, self._close_stream)

    def _close_stream(self, rid: RequestId, finished: bool) -> None:
        self._streams.pop(rid, None)
        if not finished and self.running:
            self._submit(lambda: self.engine.abort(rid), None)

    async def generate(
        self,
        prompt: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Submit a request and yield its deltas (new tokens and text) as they arrive, the
        last one finished; leaving the loop early aborts the request."""
        stream = await self.add_request(prompt, sampling_params, request_id=request_id)
        async with stream:
            async for delta in stream:
                yield delta

    async def abort(self, request_id: RequestId) -> None:
        """Abort a request; its stream ends with a ``finish_reason == "abort"`` delta."""
        await self.call(lambda: self._deliver_abort(request_id))

    def _deliver_abort(self, request_id: RequestId) -> None:
        delta = self.engine.abort(request_id)
        if delta is not None:
            self._deliver([delta])

    # -- control ------------------------------------------------------------------------------

    async def pause(self) -> None:
        """Stop stepping (requests stay queued and keep their state)."""
        await self.call(lambda: setattr(self, "_paused", True))

    async def unpause(self) -> None:
        await self.call(lambda: setattr(self, "_paused", False))

    async def suspend(self, mode: str | None = None) -> None:
        """Free the KV cache between steps (see ``DynamicInferenceEngine.suspend``)."""
        await self.call(lambda: self.engine.suspend(mode))

    async def resume(self) -> None:
        await self.call(self.engine.resume)

    async def update_weights(self, weights: Any, **kwargs: Any) -> None:
        await self.call(lambda: self.engine.update_weights(weights, **kwargs))

    async def stats(self) -> dict[str, Any]:
        stats = await self.call(self.engine.stats)
        return {**stats.to_dict(), "paused": self._paused}

    async def health(self) -> dict[str, Any]:
        """``status`` ``ok`` while the stepping thread runs (else ``stopped``), with whether
        the engine is paused or suspended and its request counts."""
        if not self.running:
            return {"status": "stopped"}
        stats = await self.stats()
        return {
            "status": "ok",
            "paused": self._paused,
            "suspended": bool(self.engine.suspended),
            "running": stats.get("running", 0),
            "waiting": stats.get("waiting", 0),
        }

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the stepping thread between steps; returns (or raises) its result."""
        if not self.running:
            raise EngineStateError("the async engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._submit(fn, future)
        return await future

    # -- the thread ---------------------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any], future: asyncio.Future | None) -> None:
        self._commands.put((fn, future))
        self._wake.set()

    def _resolve(self, future: asyncio.Future | None, result: Any, error: BaseException | None):
        if future is None:
            return

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        assert self._loop is not None  # start() runs before any command
        self._loop.call_soon_threadsafe(settle)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except Exception as exc:
                self._resolve(future, None, exc)
            else:
                self._resolve(future, result, None)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            self._run_commands()
            if self._stopping:
                break
            if self._paused or engine.suspended or not engine.has_unfinished_requests():
                try:
                    if engine.idle():
                        continue  # it joined a step of its group: look again at once
                except EngineLostError as exc:
                    log.error("the engine is lost: %s", exc)
                    self.lost = exc
                    break
                self._wake.wait(self.idle_poll_s)
                continue
            try:
                deltas = engine.step()
            except EngineLostError as exc:
                # A model replica missing a rank cannot step again: stop, and leave the
                # requests to whoever serves this engine (the coordinator fails them).
                log.error("the engine is lost: %s", exc)
                self.lost = exc
                break
            except Exception as exc:  # a failed step must not leave requests hanging
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                continue
            if deltas:
                self._deliver(deltas)
        self._run_commands()
        if self.lost is None:
            engine.close()  # ranks that step with this one learn that it stops

    def _fail_all(self, message: str) -> None:
        for request in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            delta = self.engine.abort(request.request_id)
            if delta is not None:
                delta.finish_reason, delta.error = "error", message
                self._deliver([delta])

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        def put() -> None:
            for delta in deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None:
                    stream.put_nowait(delta)

        assert self._loop is not None  # start() runs before any step
        self._loop.call_soon_threadsafe(put)
