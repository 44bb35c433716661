"""``InferenceClient``: submit requests and control signals to a coordinator, from asyncio.

    client = await InferenceClient(address).start(wait_for_engines=2)
    out = await client.submit(prompt_token_ids, SamplingParams(max_tokens=32))
    async for delta in client.generate(prompt_token_ids, params):     # streamed
        ...                                                          # the new tokens, text
    await client.suspend(); await client.resume()
    await client.close()

Prompts are token ids (tokenize in the front end). Streams yield the deltas the engine ranks
send (:class:`~mcore.inference.request.RequestDelta`, as the in-process engine's do), and join
them into the whole output (``stream.final()``, ``submit``). A request the engine refuses
raises ``InvalidRequestError`` (or ``ContextOverflowError``) from ``generate``/``submit``, as
the in-process engine does; a request that fails later (its rank died) ends with a delta whose
``finish_reason`` is ``error`` and whose ``error`` says why. ``close()`` ends every open stream
with ``RequestFailedError`` and never waits on the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import zmq
import zmq.asyncio

from mcore.inference import errors
from mcore.inference.coordinator.messages import Signal, pack, unpack
from mcore.inference.errors import InferenceError, RequestFailedError, RequestId
from mcore.inference.request import RequestDelta, RequestOutput
from mcore.inference.sampling import SamplingParams
from mcore.inference.streams import RequestStream


class CoordinatorError(InferenceError):
    """The coordinator answered with an error, or did not answer in time."""


def _rejection(message: dict[str, Any], rid: RequestId) -> Exception:
    kind = getattr(errors, str(message.get("error_type")), None)
    text = str(message.get("error"))
    text = text.removeprefix(f"request {rid!r}: ")  # the rebuilt error names it again
    if isinstance(kind, type) and issubclass(kind, errors.ContextOverflowError):
        tokens, limit = message.get("tokens"), message.get("limit")
        return errors.ContextOverflowError(
            text,
            request_id=rid,
            tokens=tokens if isinstance(tokens, int) else -1,
            limit=limit if isinstance(limit, int) else -1,
        )
    return errors.InvalidRequestError(text, field=message.get("field"), request_id=rid)


class InferenceClient:
    """A DEALER connection to an :class:`InferenceCoordinator`, used from one event loop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ctx: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task | None = None
        self._streams: dict[RequestId, _Stream] = {}
        self._replies: dict[Any, asyncio.Future] = {}
        self._ids = itertools.count()
        self._closed = False

    async def start(self, *, wait_for_engines: int = 0, timeout_s: float = 60.0) -> InferenceClient:
        """Connect and greet the coordinator; optionally wait until ``wait_for_engines`` ranks
        are registered and alive."""
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        self._receiver = asyncio.create_task(self._receive_loop())
        hello = self._expect("hello")
        await self._socket.send(pack("hello"))
        await self._wait(hello, timeout_s, "the coordinator did not answer hello")
        if wait_for_engines:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while True:
                status = await self.status()
                alive = sum(1 for e in status["engines"] if e["alive"])
                if alive >= wait_for_engines:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise CoordinatorError(
                        f"only {alive} of {wait_for_engines} engine ranks registered within "
                        f"{timeout_s:.0f} s"
                    )
                await asyncio.sleep(0.1)
        return self

    async def __aenter__(self) -> InferenceClient:
        return self if self._socket is not None else await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect; open streams end with ``RequestFailedError``."""
        if self._closed:
            return
        self._closed = True
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for rid, state in list(self._streams.items()):
            failure = RequestFailedError("the client was closed", request_id=rid)
            if not state.accepted.done():
                state.accepted.set_exception(failure)
            state.queue.put_nowait(failure)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(CoordinatorError("the client was closed"))
        if self._socket is not None and self._ctx is not None:  # both set by start()
            self._socket.close(linger=0)
            self._ctx.term()

    # -- requests -----------------------------------------------------------------------------

    async def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> RequestStream:
        """Submit a request; returns the stream of its deltas once an engine rank accepted it.
        Raises ``InvalidRequestError`` / ``ContextOverflowError`` if it refused."""
        socket = self._check_open()
        params = sampling_params or SamplingParams()
        rid = request_id if request_id is not None else f"client-{next(self._ids)}"
        if rid in self._streams:
            raise errors.InvalidRequestError("a live request already has this id", request_id=rid)
        prompt = [int(t) for t in prompt_token_ids]
        state = _Stream(asyncio.Queue(), rid)
        self._streams[rid] = state
        try:
            await socket.send(
                pack("submit", rid=rid, prompt_token_ids=prompt, sampling_params=params.to_dict())
            )
            await state.accepted
        except BaseException:
            self._streams.pop(rid, None)
            raise
        return RequestStream(rid, state.queue, self._close_stream, prompt_token_ids=prompt)

    async def _close_stream(self, rid: RequestId, finished: bool) -> None:
        self._streams.pop(rid, None)
        if not finished and not self._closed and self._socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                await self._socket.send(pack("abort", rid=rid))

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Submit a request; yield its deltas, the last one finished. Leaving the loop early
        aborts it."""
        stream = await self.add_request(prompt_token_ids, sampling_params, request_id=request_id)
        async with stream:
            async for delta in stream:
                yield delta

    async def submit(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> RequestOutput:
        """Submit a request and return its final output."""
        stream = await self.add_request(prompt_token_ids, sampling_params, request_id=request_id)
        return await stream.final()

    async def abort(self, request_id: RequestId) -> None:
        socket = self._check_open()
        await socket.send(pack("abort", rid=request_id))

    # -- control ------------------------------------------------------------------------------

    async def control(self, signal: Signal | str, *, timeout_s: float = 120.0) -> int:
        """Send a control signal; returns once every live rank acknowledged it (the number of
        ranks that did)."""
        socket = self._check_open()
        signal = Signal(signal)
        cid = f"c{next(self._ids)}"
        reply = self._expect(cid)
        await socket.send(pack("control", cid=cid, signal=signal.value))
        message = await self._wait(reply, timeout_s, f"{signal.value} was not acknowledged")
        return int(message.get("engines", 0))

    async def pause(self) -> int:
        return await self.control(Signal.PAUSE)

    async def unpause(self) -> int:
        return await self.control(Signal.UNPAUSE)

    async def suspend(self) -> int:
        return await self.control(Signal.SUSPEND)

    async def resume(self) -> int:
        return await self.control(Signal.RESUME)

    async def stop(self) -> int:
        return await self.control(Signal.STOP)

    async def status(self, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """``{"engines": [{rank, pid, alive, inflight}], "pending": n}``."""
        socket = self._check_open()
        cid = f"s{next(self._ids)}"
        reply = self._expect(cid)
        await socket.send(pack("status", cid=cid))
        message = await self._wait(reply, timeout_s, "no status from the coordinator")
        return {"engines": message.get("engines", []), "pending": message.get("pending", 0)}

    async def health(self) -> dict[str, Any]:
        """``status`` ``ok`` while at least one engine rank is alive (else ``unavailable``), with
        the ranks alive out of those that joined."""
        engines = (await self.status())["engines"]
        alive = sum(1 for e in engines if e["alive"])
        return {
            "status": "ok" if alive else "unavailable",
            "engines_alive": alive,
            "engines": len(engines),
        }

    async def stats(self) -> dict[str, Any]:
        status = await self.status()
        engines = status["engines"]
        return {
            "engines_alive": sum(1 for e in engines if e["alive"]),
            "running": sum(e["inflight"] for e in engines),
            "waiting": status["pending"],
        }

    # -- plumbing -----------------------------------------------------------------------------

    def _check_open(self) -> zmq.asyncio.Socket:
        """The connected socket; raises when the client is not (or no longer) connected."""
        if self._socket is None or self._closed:
            raise CoordinatorError("the client is not connected: await start() first")
        return self._socket

    def _expect(self, key: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        return future

    async def _wait(self, future: asyncio.Future, timeout_s: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise CoordinatorError(f"{what} within {timeout_s:.0f} s ({self.address})") from None
        finally:
            for key, value in list(self._replies.items()):
                if value is future:
                    del self._replies[key]

    async def _receive_loop(self) -> None:
        socket = self._socket
        assert socket is not None  # start() connects before it starts this loop
        while True:
            message = unpack(await socket.recv())
            kind = message["type"]
            if kind == "output":
                rid: Any = message.get("rid")
                state = self._streams.get(rid)
                if state is not None:
                    state.receive(message)
            elif kind == "hello":
                self._settle("hello", message)
            elif kind in ("control_done", "status"):
                self._settle(message.get("cid"), message)
            elif kind == "error":
                error = CoordinatorError(f"coordinator: {message.get('message')}")
                for future in self._replies.values():
                    if not future.done():
                        future.set_exception(error)

    def _settle(self, key: Any, message: dict[str, Any]) -> None:
        future = self._replies.get(key)
        if future is not None and not future.done():
            future.set_result(message)


class _Stream:
    """A request's queue of deltas, and whether a rank accepted it yet."""

    def __init__(self, queue: asyncio.Queue, request_id: RequestId) -> None:
        self.queue = queue
        self.request_id = request_id
        self.num_generated = 0
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    def receive(self, message: dict[str, Any]) -> None:
        if message.get("rejected"):
            if not self.accepted.done():
                self.accepted.set_exception(_rejection(message, self.request_id))
            return
        if not self.accepted.done():
            self.accepted.set_result(None)
        if message.get("accepted"):
            return
        token_ids = message.get("token_ids") or []
        # The coordinator's own outputs (a rank died, none alive) carry no count: keep it here.
        self.num_generated += len(token_ids)
        fields = {"request_id": self.request_id, "num_generated": self.num_generated}
        self.queue.put_nowait(RequestDelta.from_dict({**message, **fields, "token_ids": token_ids}))
