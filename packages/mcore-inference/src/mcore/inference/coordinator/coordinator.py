"""``InferenceCoordinator``: one ZMQ ROUTER in front of data-parallel engine ranks.

Engine ranks connect and register (a handshake: ``register`` answered by ``registered``);
clients connect and say ``hello``. Requests are spread over the live ranks round-robin and
each output is routed back to the client that submitted the request. Control signals (PAUSE,
UNPAUSE, SUSPEND, RESUME, STOP) go to every live rank and are reported done to the client only
once each of them acknowledged.

A rank that stops sending (heartbeats every fraction of a second) for ``heartbeat_timeout_s``,
or that the socket can no longer reach, is declared dead: its requests in flight fail at once
with an error naming the rank, and the others keep serving. Requests submitted before any rank
registered wait for the first one.

Run it in the current event loop (``await coordinator.serve()``) or in a thread of its own
(``coordinator.start()``), which is safe to call from inside a running loop: it never touches
the caller's loop. ``stop()`` / ``aclose()`` end it without waiting on anything that could
block: pending requests fail with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from mcore.inference.coordinator.messages import ProtocolError, Signal, pack, unpack

log = logging.getLogger(__name__)


@dataclass
class _Engine:
    identity: bytes
    rank: int
    pid: int
    last_seen: float
    inflight: set[int] = field(default_factory=set)
    alive: bool = True


@dataclass
class _Route:
    client: bytes
    client_rid: Any
    engine: bytes | None = None


@dataclass
class _Control:
    client: bytes
    client_cid: Any
    signal: Signal
    waiting: set[bytes]
    acked: int = 0


class InferenceCoordinator:
    """Routes requests and control signals between clients and engine ranks."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        heartbeat_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._engines: dict[bytes, _Engine] = {}
        self._order: list[bytes] = []
        self._next = 0
        self._routes: dict[int, _Route] = {}
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._controls: dict[int, _Control] = {}
        self._ids = itertools.count()
        self._socket: zmq.asyncio.Socket | None = None
        self._ready = threading.Event()
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stopped_by_signal = False

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the coordinator has not bound its port yet")
        return f"tcp://{self.host}:{self.port}"

    # -- running ------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> str:
        """Serve in a background thread with its own event loop; returns the address."""
        if self._thread is not None:
            return self.address
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_captured()),
            name="mcore-coordinator",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the coordinator did not start")
        if self._error is not None:
            raise self._error
        return self.address

    async def _serve_captured(self) -> None:
        try:
            await self.serve()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    async def wait_started(self, timeout_s: float = 30.0) -> str:
        """Wait (without blocking the loop) until the ROUTER is bound; returns the address."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start")
            await asyncio.sleep(0.01)
        if self._error is not None:
            raise self._error
        return self.address

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop a coordinator started with :meth:`start` (from any thread)."""
        if self._loop is not None and self._closing is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._closing.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def aclose(self) -> None:
        """Stop a coordinator served in this loop with :meth:`serve`."""
        if self._closing is not None:
            self._closing.set()

    async def serve(self) -> None:
        """Bind the ROUTER and route messages until stopped (or a STOP signal completes)."""
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Sending to a peer that is gone raises instead of silently dropping the message.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.port is None:
            self.port = sock.bind_to_random_port(f"tcp://{self.host}")
        else:
            sock.bind(f"tcp://{self.host}:{self.port}")
        self._socket = sock
        self._ready.set()
        log.info("coordinator listening on %s", self.address)
        tasks = [
            asyncio.create_task(self._receive_loop()),
            asyncio.create_task(self._watchdog()),
        ]
        try:
            await self._closing.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._fail_everything("the coordinator stopped")
            sock.close(linger=0)
            ctx.term()
            self._socket = None

    # -- messages -----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        sock = self._socket
        assert sock is not None  # bound before the loop starts
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                continue
            identity, frame = frames
            try:
                message = unpack(frame)
                await self._handle(identity, message)
            except ProtocolError as exc:
                await self._send(identity, "error", message=str(exc))
            except Exception:  # one bad message must not stop the router
                log.exception("coordinator: failed to handle a message from %r", identity)

    async def _handle(self, identity: bytes, message: dict[str, Any]) -> None:
        kind = message["type"]
        engine = self._engines.get(identity)
        if engine is not None:
            engine.last_seen = time.monotonic()
            if not engine.alive and kind != "register":
                return  # a rank declared dead must register again
        handler = {
            "register": self._on_register,
            "heartbeat": self._on_heartbeat,
            "goodbye": self._on_goodbye,
            "output": self._on_output,
            "ack": self._on_ack,
            "hello": self._on_hello,
            "submit": self._on_submit,
            "abort": self._on_abort,
            "control": self._on_control,
            "status": self._on_status,
        }.get(kind)
        if handler is None:
            await self._send(identity, "error", message=f"unknown message type {kind!r}")
            return
        await handler(identity, message)

    async def _send(self, identity: bytes, kind: str, **fields: Any) -> bool:
        """Send to a peer; False when it is gone (an engine then counts as dead)."""
        assert self._socket is not None, "sends happen while serving"
        try:
            await self._socket.send_multipart([identity, pack(kind, **fields)])
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            engine = self._engines.get(identity)
            if engine is not None and engine.alive:
                await self._engine_died(engine, "its socket is no longer connected")
            return False

    # -- engines ------------------------------------------------------------------------------

    async def _on_register(self, identity: bytes, message: dict[str, Any]) -> None:
        engine = _Engine(
            identity, int(message.get("rank", -1)), int(message.get("pid", -1)), time.monotonic()
        )
        self._engines[identity] = engine
        if identity not in self._order:
            self._order.append(identity)
        log.info("engine rank %d (pid %d) registered", engine.rank, engine.pid)
        await self._send(identity, "registered", engine=len(self._order) - 1)
        pending, self._pending = self._pending, []
        for gid, submit in pending:
            await self._dispatch(gid, submit)

    async def _on_heartbeat(self, identity: bytes, message: dict[str, Any]) -> None:
        pass  # last_seen is updated for every message

    async def _on_goodbye(self, identity: bytes, message: dict[str, Any]) -> None:
        engine = self._engines.get(identity)
        if engine is not None and engine.alive:
            await self._engine_died(engine, str(message.get("reason") or "it shut down"))

    def _live(self) -> list[_Engine]:
        return [self._engines[i] for i in self._order if self._engines[i].alive]

    async def _watchdog(self) -> None:
        interval = min(0.5, self.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for engine in self._live():
                silent = now - engine.last_seen
                if silent > self.heartbeat_timeout_s:
                    await self._engine_died(engine, f"no heartbeat for {silent:.1f} s")

    async def _engine_died(self, engine: _Engine, why: str) -> None:
        engine.alive = False
        if engine.identity in self._order:
            self._order.remove(engine.identity)
        log.warning("engine rank %d (pid %d) is dead: %s", engine.rank, engine.pid, why)
        message = (
            f"engine rank {engine.rank} (pid {engine.pid}) died or stopped responding ({why}); "
            "the request was in flight there and failed (it was not retried)"
        )
        for gid in sorted(engine.inflight):
            route = self._routes.pop(gid, None)
            if route is not None:
                await self._send(
                    route.client,
                    "output",
                    rid=route.client_rid,
                    engine_rank=engine.rank,
                    token_ids=[],
                    finished=True,
                    finish_reason="error",
                    error=message,
                )
        engine.inflight.clear()
        for cid in list(self._controls):
            self._controls[cid].waiting.discard(engine.identity)
            await self._maybe_done(cid)

    # -- requests -----------------------------------------------------------------------------

    async def _on_hello(self, identity: bytes, message: dict[str, Any]) -> None:
        await self._send(identity, "hello", engines=len(self._live()))

    async def _on_submit(self, identity: bytes, message: dict[str, Any]) -> None:
        gid = next(self._ids)
        self._routes[gid] = _Route(identity, message.get("rid"))
        submit = {
            "prompt_token_ids": message.get("prompt_token_ids"),
            "sampling_params": message.get("sampling_params") or {},
        }
        if not self._engines:
            self._pending.append((gid, submit))  # wait for the first rank
            return
        await self._dispatch(gid, submit)

    async def _dispatch(self, gid: int, submit: dict[str, Any]) -> None:
        route = self._routes.get(gid)
        if route is None:
            return
        while True:
            live = self._live()
            if not live:
                self._routes.pop(gid, None)
                await self._send(
                    route.client,
                    "output",
                    rid=route.client_rid,
                    token_ids=[],
                    finished=True,
                    finish_reason="error",
                    error="no engine rank is alive to serve the request",
                )
                return
            engine = live[self._next % len(live)]
            self._next += 1
            route.engine = engine.identity
            engine.inflight.add(gid)
            if await self._send(engine.identity, "submit", rid=gid, **submit):
                return
            engine.inflight.discard(gid)  # it died just now: try the next rank

    async def _on_output(self, identity: bytes, message: dict[str, Any]) -> None:
        gid: Any = message.get("rid")
        route = self._routes.get(gid)
        engine = self._engines.get(identity)
        if engine is None or route is None or route.engine != identity:
            return  # not from a rank, aborted, or from a rank that was declared dead
        finished = bool(message.get("finished"))
        if finished:
            del self._routes[gid]
            engine.inflight.discard(gid)
        fields = {k: v for k, v in message.items() if k not in ("type", "rid")}
        delivered = await self._send(
            route.client, "output", rid=route.client_rid, engine_rank=engine.rank, **fields
        )
        if not delivered and not finished:  # the client is gone: stop the work
            del self._routes[gid]
            engine.inflight.discard(gid)
            await self._send(identity, "abort", rid=gid)

    async def _on_abort(self, identity: bytes, message: dict[str, Any]) -> None:
        client_rid = message.get("rid")
        for gid, route in list(self._routes.items()):
            if route.client == identity and route.client_rid == client_rid:
                if route.engine is None:
                    self._pending = [(g, s) for g, s in self._pending if g != gid]
                    del self._routes[gid]
                    await self._send(
                        identity,
                        "output",
                        rid=client_rid,
                        token_ids=[],
                        finished=True,
                        finish_reason="abort",
                    )
                else:
                    await self._send(route.engine, "abort", rid=gid)

    # -- control ------------------------------------------------------------------------------

    async def _on_control(self, identity: bytes, message: dict[str, Any]) -> None:
        try:
            signal = Signal(message.get("signal"))
        except ValueError:
            await self._send(
                identity,
                "error",
                message=f"unknown signal {message.get('signal')!r}; known: "
                f"{', '.join(s.value for s in Signal)}",
            )
            return
        cid = next(self._ids)
        live = self._live()
        self._controls[cid] = _Control(
            identity, message.get("cid"), signal, {e.identity for e in live}
        )
        for engine in live:
            await self._send(engine.identity, "control", cid=cid, signal=signal.value)
        await self._maybe_done(cid)

    async def _on_ack(self, identity: bytes, message: dict[str, Any]) -> None:
        cid: Any = message.get("cid")
        control = self._controls.get(cid)
        if control is None:
            return
        if identity not in control.waiting:
            return  # not a rank this signal went to
        control.waiting.discard(identity)
        control.acked += 1
        if control.signal is Signal.STOP:
            engine = self._engines[identity]
            engine.alive = False  # it exits after acknowledging
            if identity in self._order:
                self._order.remove(identity)
        await self._maybe_done(cid)

    async def _maybe_done(self, cid: int) -> None:
        control = self._controls.get(cid)
        if control is None or control.waiting:
            return
        del self._controls[cid]
        await self._send(
            control.client,
            "control_done",
            cid=control.client_cid,
            signal=control.signal.value,
            engines=control.acked,
        )
        if control.signal is Signal.STOP:
            self.stopped_by_signal = True
            assert self._closing is not None  # set up when serving started
            self._closing.set()

    async def _on_status(self, identity: bytes, message: dict[str, Any]) -> None:
        await self._send(
            identity,
            "status",
            cid=message.get("cid"),
            engines=[
                {"rank": e.rank, "pid": e.pid, "alive": e.alive, "inflight": len(e.inflight)}
                for e in self._engines.values()
            ],
            pending=len(self._pending),
        )

    async def _fail_everything(self, why: str) -> None:
        if self._socket is None:
            return
        for gid, route in list(self._routes.items()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._send(
                        route.client,
                        "output",
                        rid=route.client_rid,
                        token_ids=[],
                        finished=True,
                        finish_reason="error",
                        error=why,
                    ),
                    timeout=1.0,
                )
            del self._routes[gid]
