"""``ReplicaEngine``: one engine over the ranks of a model replica, stepping in lockstep.

A model split over tensor-parallel ranks or pipeline stages runs one engine per rank; every
rank must add the same requests in the same order and step together, so that all take
identical scheduling and sampling decisions (sampling is seeded alike) and meet in the same
collectives. One rank, the *leader*, takes requests (from the Python API, an
``AsyncInferenceEngine`` or the coordinator) and, before each step, broadcasts what changed
since the last one: requests added (as token ids, with their ids and sampling parameters),
aborted, and suspend/resume. The other ranks *follow*: they receive, apply and step, until
the leader closes the replica::

    engine = ReplicaEngine(model, config, tokenizer=tokenizer, group=control_group)
    if engine.is_leader:
        outputs = engine.generate(prompts, params)   # or serve it; then:
        engine.close()
    else:
        engine.follow()

The broadcasts go over ``group``, a CPU (gloo) group of the replica's ranks, so on GPUs they
never queue behind the model's NCCL kernels. While the leader has nothing to step it sends an
empty message every ``keepalive_s``, so idle followers never reach the group's timeout; a
rank of the replica that dies breaks the next broadcast or collective, and the leader then
raises :class:`ReplicaLostError` (and stays broken): a replica missing a rank cannot serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist

from mcore.inference.config import InferenceConfig
from mcore.inference.engine import DynamicInferenceEngine
from mcore.inference.errors import EngineLostError, EngineStateError, RequestId
from mcore.inference.request import RequestDelta
from mcore.inference.sampling import SamplingParams

log = logging.getLogger(__name__)

_STEP, _CLOSE = "step", "close"


class ReplicaLostError(EngineLostError):
    """A rank of the model replica is gone (a failed broadcast or collective): the replica
    can no longer step, and every request on it fails."""


class ReplicaEngine(DynamicInferenceEngine):
    """A :class:`DynamicInferenceEngine` whose ranks (the TP ranks of one model replica) step
    in lockstep; see the module docstring. ``group`` is a CPU process group of the replica's
    ranks (default: the whole world), ``leader`` the global rank that takes requests (default:
    the group's first)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: InferenceConfig | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        leader: int | None = None,
        keepalive_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, config, **kwargs)
        self.group = group
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        self.leader = ranks[0] if leader is None else leader
        self.is_leader = dist.get_rank() == self.leader
        self.keepalive_s = keepalive_s
        self._journal: list[tuple[Any, ...]] = []
        self._last_sent = time.monotonic()
        self._lost: ReplicaLostError | None = None
        self._closed = False

    # -- the leader ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> RequestId:
        """Queue a request here and, with the next step, on every follower (as token ids)."""
        self._check_leader("add_request")
        rid = super().add_request(prompt, sampling_params, request_id=request_id)
        request = self.get_request(rid)
        assert request is not None  # just queued
        self._journal.append(("add", request.prompt_token_ids, request.params, rid))
        return rid

    def abort(self, request_id: RequestId) -> RequestDelta | None:
        self._check_leader("abort")
        out = super().abort(request_id)
        if out is not None:
            self._journal.append(("abort", request_id))
        return out

    def step(self) -> list[RequestDelta]:
        """Broadcast the changes since the last step, then step with every follower."""
        self._check_leader("step")
        self._send(_STEP)
        try:
            return super().step()
        except Exception as exc:
            if self.world_broken(exc):
                raise self._lose(exc) from exc
            raise

    def suspend(self, mode: str | None = None) -> None:
        """Suspend every rank of the replica now (each frees its own KV cache)."""
        self._check_leader("suspend")
        was = self.suspended
        super().suspend(mode)
        if not was:
            self._journal.append(("suspend", mode))
            self._send(None)

    def resume(self) -> None:
        self._check_leader("resume")
        was = self.suspended
        super().resume()
        if was:
            self._journal.append(("resume",))
            self._send(None)

    def idle(self) -> bool:
        """Keep idle followers waiting within the group's timeout (a driver calls this while
        there is nothing to step)."""
        live = self.is_leader and not self._closed and self._lost is None
        if live and time.monotonic() - self._last_sent >= self.keepalive_s:
            self._send(None)
        return False

    def close(self) -> None:
        """Release the followers (their :meth:`follow` returns). Safe to call twice, and a no-op
        on a lost replica."""
        if self.is_leader and not self._closed and self._lost is None:
            self._closed = True
            self._send(_CLOSE)

    @property
    def lost(self) -> ReplicaLostError | None:
        """Why the replica broke, or None while every rank is there."""
        return self._lost

    def _check_leader(self, what: str) -> None:
        if not self.is_leader:
            raise EngineStateError(
                f"{what}() on a follower rank of a model replica: requests go to the leader "
                f"(global rank {self.leader}); followers run follow()"
            )
        if self._lost is not None:
            raise self._lost
        if self._closed:
            raise EngineStateError("the replica is closed")

    def _send(self, action: str | None) -> None:
        message = [(self._journal, action)]
        self._journal = []
        try:
            dist.broadcast_object_list(message, src=self.leader, group=self.group)
        except Exception as exc:
            raise self._lose(exc) from exc
        self._last_sent = time.monotonic()

    def _lose(self, exc: BaseException) -> ReplicaLostError:
        if self._lost is None:
            ranks = dist.get_process_group_ranks(self.group or dist.group.WORLD)
            self._lost = ReplicaLostError(
                f"a rank of this model replica (global ranks {ranks}) is gone: "
                f"{type(exc).__name__}: {exc}"
            )
            log.error("%s", self._lost)
        return self._lost

    @staticmethod
    def world_broken(exc: BaseException) -> bool:
        """Whether ``exc`` is a failed collective (a peer gone), not a bug of this rank."""
        kinds = tuple(
            k for k in (getattr(dist, "DistError", None), getattr(torch, "DistBackendError", None))
            if k is not None
        )  # fmt: skip
        text = str(exc).lower()
        return isinstance(exc, kinds) or any(
            marker in text for marker in ("connection closed", "connection reset", "gloo", "nccl")
        )

    # -- a follower ---------------------------------------------------------------------------

    def follow(self) -> int:
        """Apply the leader's changes and step with it until it closes the replica; returns
        the number of steps taken. Raises ``ReplicaLostError`` when the leader is gone."""
        if self.is_leader:
            raise EngineStateError("follow() is for the follower ranks; the leader steps")
        steps = 0
        while True:
            message: list[Any] = [None]
            try:
                dist.broadcast_object_list(message, src=self.leader, group=self.group)
            except Exception as exc:
                raise self._lose(exc) from exc
            journal, action = message[0]
            for change in journal:
                self._apply(change)
            if action == _CLOSE:
                return steps
            if action == _STEP:
                try:
                    DynamicInferenceEngine.step(self)
                except Exception as exc:
                    if self.world_broken(exc):
                        raise self._lose(exc) from exc
                    raise
                steps += 1

    def _apply(self, change: tuple[Any, ...]) -> None:
        kind, *args = change
        if kind == "add":
            prompt, params, rid = args
            DynamicInferenceEngine.add_request(self, prompt, params, request_id=rid)
        elif kind == "abort":
            DynamicInferenceEngine.abort(self, args[0])
        elif kind == "suspend":
            DynamicInferenceEngine.suspend(self, args[0])
        elif kind == "resume":
            DynamicInferenceEngine.resume(self)
        else:
            raise EngineStateError(f"unknown change {kind!r} from the replica's leader")


def join_replica(
    url: str,
    *,
    rank: int,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    device: str | None = None,
    timeout_s: float = 600.0,
) -> tuple[dist.ProcessGroup | None, Any]:
    """Join the process group of one model replica (``tp x pp`` ranks meeting at ``url``,
    ``tcp://HOST:PORT``), or of ``ep`` replicas sharing their experts; returns the CPU group
    for :class:`ReplicaEngine` (None: the world itself is gloo) and the ``ParallelState``. On
    CUDA the model's collectives use NCCL and this rank takes the device ``device`` names
    (``cuda:i``)."""
    from mcore.parallel import ParallelState

    cuda = device is not None and device.startswith("cuda")
    if device is not None and cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        init_method=url,
        rank=rank,
        world_size=tp * pp * ep,
        timeout=timedelta(seconds=timeout_s),
    )
    group = cast("dist.ProcessGroup", dist.new_group(backend="gloo")) if cuda else None
    return group, ParallelState(tp=tp, pp=pp, ep=ep, device_type="cuda" if cuda else "cpu")
