"""One data-parallel engine rank: an engine served to the coordinator over a DEALER socket.

The rank registers (``register`` until ``registered``), then serves: every ``submit`` becomes a
request of its :class:`~mcore.inference.async_engine.AsyncInferenceEngine` whose outputs go back
as deltas; control signals are carried out between steps and acknowledged. A heartbeat goes out
every ``heartbeat_interval_s`` from the event loop while the engine steps in its own thread.

As a process (what ``mcore serve --inference.data-parallel-size N`` starts, and the tests)::

    python -m mcore.inference.coordinator.engine_rank --model DIR --coordinator tcp://... \\
        --rank 0 [--config-json '{"max_requests": 8}']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

import zmq
import zmq.asyncio

from mcore.inference.async_engine import AsyncInferenceEngine
from mcore.inference.coordinator.messages import Signal, pack, unpack
from mcore.inference.engine import DynamicInferenceEngine
from mcore.inference.errors import InvalidRequestError, error_payload
from mcore.inference.request import RequestOutput
from mcore.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineRank:
    """Serves one engine to the coordinator at ``address`` until a STOP signal."""

    def __init__(
        self,
        engine: DynamicInferenceEngine,
        address: str,
        *,
        rank: int = 0,
        heartbeat_interval_s: float = 0.5,
        register_timeout_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.address = address
        self.rank = rank
        self.heartbeat_interval_s = heartbeat_interval_s
        self.register_timeout_s = register_timeout_s
        self._outbox: asyncio.Queue[bytes] | None = None
        self._served: AsyncInferenceEngine | None = None
        self._tasks: dict[Any, asyncio.Task] = {}

    def run(self, *, parent_pid: int | None = None) -> None:
        """Serve in a new event loop (a process's main function). SIGINT and SIGTERM end it
        cleanly; with ``parent_pid`` it also ends when that process is gone (a server that
        started this rank died), so no rank outlives its server."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            watch = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
            try:
                await self.serve(stop=stop)
            finally:
                if watch is not None:
                    watch.cancel()

        asyncio.run(main())

    async def serve(self, *, stop: asyncio.Event | None = None) -> None:
        """Register and serve until a STOP signal (or ``stop`` is set: then the rank says
        ``goodbye``, and the coordinator fails what it had in flight)."""
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"engine-{self.rank}-{os.getpid()}".encode())
        sock.connect(self.address)
        self._outbox = asyncio.Queue()
        self._served = await AsyncInferenceEngine(self.engine).start()
        sender = asyncio.create_task(self._send_loop(sock))
        heartbeat = None
        try:
            await self._register(sock)
            heartbeat = asyncio.create_task(self._heartbeat_loop())
            receive = asyncio.create_task(self._receive_loop(sock))
            stopped = asyncio.create_task((stop or asyncio.Event()).wait())
            await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if receive.done():
                receive.result()  # a STOP signal, or an error to raise
            else:
                receive.cancel()
                self._post("goodbye", rank=self.rank)
            stopped.cancel()
        finally:
            for task in (heartbeat, *self._tasks.values()):
                if task is not None:
                    task.cancel()
            await self._drain_outbox(sock)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await self._served.shutdown()
            sock.close(linger=0)
            ctx.term()

    def _post(self, kind: str, **fields: Any) -> None:
        self._outbox.put_nowait(pack(kind, **fields))

    async def _send_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frame = await self._outbox.get()
            await sock.send(frame)

    async def _drain_outbox(self, sock: zmq.asyncio.Socket) -> None:
        # What is queued when STOP arrives (final outputs, the ack) still goes out.
        try:
            while not self._outbox.empty():
                await asyncio.wait_for(sock.send(self._outbox.get_nowait()), timeout=1.0)
        except Exception:
            pass

    async def _register(self, sock: zmq.asyncio.Socket) -> None:
        self._post("register", rank=self.rank, pid=os.getpid())
        deadline = asyncio.get_running_loop().time() + self.register_timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no coordinator answered at {self.address}")
            if await sock.poll(timeout=remaining * 1000):
                message = unpack(await sock.recv())
                if message["type"] == "registered":
                    log.info("engine rank %d registered with %s", self.rank, self.address)
                    return

    async def _heartbeat_loop(self) -> None:
        while True:
            self._post("heartbeat")
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _receive_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            message = unpack(await sock.recv())
            kind = message["type"]
            if kind == "submit":
                rid = message["rid"]
                self._tasks[rid] = asyncio.create_task(self._serve_request(message))
            elif kind == "abort":
                await self._served.abort(message["rid"])
            elif kind == "control" and await self._control(message):
                return

    async def _control(self, message: dict[str, Any]) -> bool:
        """Carry out a signal and acknowledge it; True when the rank should exit."""
        signal = Signal(message["signal"])
        served = self._served
        if signal is Signal.PAUSE:
            await served.pause()
        elif signal is Signal.UNPAUSE:
            await served.unpause()
        elif signal is Signal.SUSPEND:
            await served.suspend()
        elif signal is Signal.RESUME:
            await served.resume()
        elif signal is Signal.STOP:
            for rid in list(self._tasks):
                await served.abort(rid)
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._post("ack", cid=message["cid"], signal=signal.value)
        return signal is Signal.STOP

    async def _serve_request(self, message: dict[str, Any]) -> None:
        rid = message["rid"]
        sent_tokens, sent_text = 0, ""
        try:
            params = SamplingParams.from_dict(message.get("sampling_params"))
            prompt = message.get("prompt_token_ids")
            if not isinstance(prompt, list):
                raise InvalidRequestError("prompt_token_ids must be a list of ints", field="prompt")
            stream = await self._served.add_request(prompt, params, request_id=rid)
            self._post("output", rid=rid, accepted=True, token_ids=[], finished=False)
            async with stream:
                async for out in stream:
                    text = out.text or ""
                    delta = _delta(out, sent_tokens, text[len(sent_text) :])
                    self._post("output", rid=rid, **delta)
                    sent_tokens, sent_text = len(out.token_ids), text
        except InvalidRequestError as exc:
            self._post(
                "output",
                rid=rid,
                rejected=True,
                finished=True,
                finish_reason="error",
                error=str(exc),
                error_type=type(exc).__name__,
                field=exc.field,
                # A context overflow says by how much, whichever path it comes back through.
                tokens=getattr(exc, "tokens", None),
                limit=getattr(exc, "limit", None),
                token_ids=[],
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("engine rank %d: request %r failed", self.rank, rid)
            payload = error_payload(exc)
            self._post(
                "output",
                rid=rid,
                finished=True,
                finish_reason="error",
                error=payload["message"],
                error_type=payload["type"],
                token_ids=[],
            )
        finally:
            self._tasks.pop(rid, None)


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("the process that started this rank (pid %d) is gone; exiting", parent_pid)
            stop.set()
            return
        await asyncio.sleep(1.0)


def _delta(out: RequestOutput, sent: int, text: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "token_ids": out.token_ids[sent:],
        "text": text,
        "finished": out.finished,
    }
    if out.logprobs is not None:
        fields["logprobs"] = out.logprobs[sent:]
    if out.top_logprobs is not None:
        fields["top_logprobs"] = [
            [[int(k), float(v)] for k, v in top.items()] for top in out.top_logprobs[sent:]
        ]
    if out.finished:
        fields.update(
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
            error=out.error,
            prompt_tokens=len(out.prompt_token_ids),
            metrics=out.metrics.to_dict() if out.metrics else None,
        )
    return fields


def main(argv: list[str] | None = None) -> int:
    """Load a model and serve it as one engine rank of a coordinator."""
    from mcore.inference.config import InferenceConfig
    from mcore.inference.loading import load_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face directory or mcore checkpoint")
    parser.add_argument("--coordinator", required=True, help="the coordinator's tcp:// address")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--config-json", default="{}", help="[inference] fields as JSON")
    parser.add_argument("--run-config", default=None, help="run config of an mcore checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is gone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[engine {args.rank}] %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = InferenceConfig(**json.loads(args.config_json))
    model, tokenizer = load_model(args.model, config_file=args.run_config)
    engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
    EngineRank(engine, args.coordinator, rank=args.rank).run(parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
