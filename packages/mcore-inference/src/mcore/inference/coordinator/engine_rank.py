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
from mcore.inference.request import RequestDelta
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
        self.lost: BaseException | None = None
        """Why the engine stopped stepping on its own (a lost replica or expert group)."""
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
            lost = asyncio.create_task(self._watch_engine())
            await asyncio.wait({receive, stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
            if receive.done():
                receive.result()  # a STOP signal, or an error to raise
            else:
                receive.cancel()
                reason = "it shut down"
                if lost.done():
                    why = self._serving.lost
                    reason = str(why) if why is not None else "its engine stopped stepping"
                self._post("goodbye", rank=self.rank, reason=reason)
            stopped.cancel()
            lost.cancel()
        finally:
            for task in (heartbeat, *self._tasks.values()):
                if task is not None:
                    task.cancel()
            await self._drain_outbox(sock)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.lost = self._serving.lost
            await self._serving.shutdown()
            sock.close(linger=0)
            ctx.term()

    @property
    def _serving(self) -> AsyncInferenceEngine:
        """The engine as :meth:`serve` runs it."""
        assert self._served is not None, "serve() starts it"
        return self._served

    @property
    def _queue(self) -> asyncio.Queue[bytes]:
        """Frames for the coordinator, sent in order by :meth:`serve`'s sender task."""
        assert self._outbox is not None, "serve() creates it"
        return self._outbox

    async def _watch_engine(self) -> None:
        """Returns when the engine's stepping thread stopped on its own (a lost replica)."""
        while self._serving.running:
            await asyncio.sleep(0.2)

    def _post(self, kind: str, **fields: Any) -> None:
        self._queue.put_nowait(pack(kind, **fields))

    async def _send_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frame = await self._queue.get()
            await sock.send(frame)

    async def _drain_outbox(self, sock: zmq.asyncio.Socket) -> None:
        # What is queued when STOP arrives (final outputs, the ack) still goes out.
        try:
            while not self._queue.empty():
                await asyncio.wait_for(sock.send(self._queue.get_nowait()), timeout=1.0)
        except Exception:
            pass

    async def _register(self, sock: zmq.asyncio.Socket) -> None:
        self._post("register", rank=self.rank, pid=os.getpid())
        deadline = asyncio.get_running_loop().time() + self.register_timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no coordinator answered at {self.address}")
            if await sock.poll(timeout=int(remaining * 1000)):
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
                await self._serving.abort(message["rid"])
            elif kind == "control" and await self._control(message):
                return

    async def _control(self, message: dict[str, Any]) -> bool:
        """Carry out a signal and acknowledge it; True when the rank should exit."""
        signal = Signal(message["signal"])
        served = self._serving
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
        try:
            params = SamplingParams.from_dict(message.get("sampling_params"))
            prompt = message.get("prompt_token_ids")
            if not isinstance(prompt, list):
                raise InvalidRequestError("prompt_token_ids must be a list of ints", field="prompt")
            stream = await self._serving.add_request(prompt, params, request_id=rid)
            self._post("output", rid=rid, accepted=True, token_ids=[], finished=False)
            async with stream:
                async for delta in stream:
                    self._post("output", rid=rid, **_fields(delta))
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


def _fields(delta: RequestDelta) -> dict[str, Any]:
    """An ``output`` message's fields: the delta as it is, less what the client knows already
    (the request id, the prompt) and what the coordinator adds (the rank)."""
    fields = delta.to_dict()
    for known in ("request_id", "prompt_token_ids", "engine_rank"):
        del fields[known]
    if not delta.finished:  # the scalars that only a finished delta sets
        for unset in ("finish_reason", "stop_reason", "error", "metrics"):
            del fields[unset]
    return fields


def main(argv: list[str] | None = None) -> int:
    """Load a model and serve it as one engine rank of a coordinator.

    With ``--tp T`` / ``--pp P`` the rank is one of the T x P processes of a model replica
    split over tensor parallelism and pipeline stages: they join ``--dist-url`` as ranks
    ``--replica-rank`` 0..T*P-1 of their own process group (a replica is its own world, so a
    dead replica takes down no other), load only their shards, and step in lockstep
    (:class:`~mcore.inference.replica.ReplicaEngine`): replica rank 0 registers with the
    coordinator as engine rank ``--rank`` and the others follow it. The processes may run on
    different hosts.
    """
    from mcore.inference.config import InferenceConfig
    from mcore.inference.loading import load_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face directory or mcore checkpoint")
    parser.add_argument("--coordinator", required=True, help="the coordinator's tcp:// address")
    parser.add_argument("--rank", type=int, default=0, help="this replica's data-parallel rank")
    parser.add_argument("--config-json", default="{}", help="[inference] fields as JSON")
    parser.add_argument("--run-config", default=None, help="run config of an mcore checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is gone"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the replica")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages of the replica")
    parser.add_argument(
        "--ep", type=int, default=1, help="replicas (this one included) sharing the experts"
    )
    parser.add_argument("--replica-rank", type=int, default=0, help="this process's rank in it")
    parser.add_argument(
        "--dist-url", default=None, help="tcp://HOST:PORT where the replica's ranks meet"
    )
    args = parser.parse_args(argv)
    replica = args.tp * args.pp
    name = f"{args.rank}" if replica == 1 else f"{args.rank}.{args.replica_rank}"
    if args.ep > 1 and replica > 1:
        raise SystemExit("--ep > 1 runs with --tp 1 and --pp 1 for now")
    logging.basicConfig(level=logging.INFO, format=f"[engine {name}] %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = InferenceConfig(**json.loads(args.config_json))
    if args.ep > 1:
        return _serve_expert_parallel(args, config)
    if replica == 1:
        model, tokenizer = load_model(args.model, config_file=args.run_config)
        engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
        EngineRank(engine, args.coordinator, rank=args.rank).run(parent_pid=args.parent_pid)
        return 0
    return _serve_replica(args, config)


def _serve_replica(args: argparse.Namespace, config: Any) -> int:
    import torch
    import torch.distributed as dist

    from mcore.inference.loading import load_model
    from mcore.inference.replica import ReplicaEngine, ReplicaLostError, join_replica

    if args.dist_url is None:
        raise SystemExit("--tp/--pp > 1 need --dist-url tcp://HOST:PORT for the replica's ranks")
    group, parallel_state = join_replica(
        args.dist_url, rank=args.replica_rank, tp=args.tp, pp=args.pp, device=config.device
    )
    model, tokenizer = load_model(
        args.model, config_file=args.run_config, parallel_state=parallel_state
    )
    engine = ReplicaEngine(model, config, tokenizer=tokenizer, group=group)
    try:
        if engine.is_leader:
            try:
                EngineRank(engine, args.coordinator, rank=args.rank).run(parent_pid=args.parent_pid)
            finally:
                engine.close()
        else:
            with torch.no_grad():
                steps = engine.follow()
            log.info("the replica's leader closed it after %d steps", steps)
    except ReplicaLostError as lost:
        log.error("engine rank %d stops: %s", args.rank, lost)
    finally:
        if engine.lost is None:
            dist.destroy_process_group()
    return 0 if engine.lost is None else 1


def _serve_expert_parallel(args: argparse.Namespace, config: Any) -> int:
    """One of ``--ep`` engine ranks sharing their experts: each registers on its own and
    serves its own requests; they step together (``ExpertParallelEngine``)."""
    import torch.distributed as dist

    from mcore.inference.expert_parallel import ExpertParallelEngine
    from mcore.inference.loading import load_model
    from mcore.inference.replica import join_replica

    if args.dist_url is None:
        raise SystemExit("--ep > 1 needs --dist-url tcp://HOST:PORT for the group's ranks")
    _, parallel_state = join_replica(
        args.dist_url, rank=args.replica_rank, ep=args.ep, device=config.device
    )
    model, tokenizer = load_model(
        args.model, config_file=args.run_config, parallel_state=parallel_state
    )
    engine = ExpertParallelEngine(model, config, tokenizer=tokenizer)
    rank = EngineRank(engine, args.coordinator, rank=args.rank)
    rank.run(parent_pid=args.parent_pid)
    lost = rank.lost
    if lost is None:
        dist.destroy_process_group()
    return 0 if lost is None else 1


if __name__ == "__main__":
    sys.exit(main())
