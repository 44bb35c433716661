"""The scheduler: which requests run in the next step, and how many tokens each computes.

Continuous batching in one token budget per step (``inference.max_tokens``): running requests
come first, in the order they were admitted, each with its next chunk (one token when
decoding, up to the rest of the budget when prefilling, so a long prompt is prefilled in chunks
over several steps); then waiting requests are admitted, oldest first, while the budget, the
request limit and the KV cache allow. A waiting request first takes the cached blocks of its
prompt's prefix.

A decoding request with draft tokens (speculative decoding, ``request.draft``) computes its
last token and the drafts in one chunk, as many drafts as the budget leaves room for.

When a running request needs a block and none is free, the most recently admitted running
request is preempted: its blocks are released and it goes back to the front of the queue with
everything it generated, to be recomputed later. No request is ever dropped; a step that had to
preempt admits nobody new.

For hybrid models each running request also holds a recurrent-state slot
(:class:`~mcore.inference.recurrent_state.StateSlots`): taken on admission, kept across prefill
chunks and decode steps, given back on finish, abort and preemption. A request is admitted
only while a slot is free.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from mcore.inference.errors import RequestId
from mcore.inference.kv_cache import KVCacheManager
from mcore.inference.recurrent_state import StateSlots
from mcore.inference.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """``request`` computes its tokens ``[start, start + num_tokens)`` this step.

    ``draft``: tokens proposed after the request's last one (speculative decoding), computed
    in the same chunk so one forward verifies them; ``num_tokens`` counts them.
    ``token_ids``: the chunk's ids when they are not the request's own (the shifted tokens a
    multi-token-prediction depth reads); ``logits``: how many of the last rows get logits
    when that is not the default (one row when the chunk samples, plus one per draft token).
    """

    request: Request
    start: int
    num_tokens: int
    draft: tuple[int, ...] = ()
    token_ids: list[int] | None = None
    logits: int | None = None

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the request's last token, so a new one is sampled."""
        return self.start + self.num_tokens - len(self.draft) == self.request.num_tokens

    @property
    def num_logits(self) -> int:
        """Rows at the end of the chunk whose logits the step returns."""
        if self.logits is not None:
            return self.logits
        return 1 + len(self.draft) if self.samples else 0

    def ids(self) -> list[int]:
        """The chunk's token ids."""
        if self.token_ids is not None:
            return self.token_ids
        own = self.request.all_token_ids[self.start : self.start + self.num_tokens]
        return own + list(self.draft) if self.draft else own


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Waiting and running requests over one :class:`KVCacheManager` (and, for hybrid models,
    the recurrent-state slots)."""

    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_requests: int,
        max_tokens: int | None,
        state_slots: StateSlots | None = None,
    ) -> None:
        self.kv = kv
        self.state_slots = state_slots
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_tokens if self.max_tokens is not None else float("inf")
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = int(min(request.num_tokens - request.num_computed_tokens, budget))
            draft = ()
            if request.draft and n == request.num_tokens - request.num_computed_tokens == 1:
                draft = tuple(request.draft[: int(min(len(request.draft), budget - 1))])
            while not self.kv.allocate(request, n + len(draft)):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                chunk = ScheduledChunk(request, request.num_computed_tokens, n + len(draft), draft)
                out.chunks.append(chunk)
                budget -= chunk.num_tokens
                i += 1
        if out.preempted:
            return out
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_requests
            and (self.state_slots is None or self.state_slots.num_free > 0)
        ):
            request = self.waiting[0]
            cached = self.kv.match_prefix(request)
            request.num_computed_tokens = cached
            n = int(min(request.num_tokens - cached, budget))
            if not self.kv.allocate(request, n):
                self.kv.free(request)  # give back the prefix blocks it took
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if self.state_slots is not None:
                self.state_slots.assign(request.request_id)  # zeroed before the forward
            request.status = RequestStatus.RUNNING
            metrics = request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = time.monotonic()
                metrics.num_cached_prompt_tokens = cached
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, cached, n))
            budget -= n
        return out

    def _release(self, request: Request) -> None:
        """Give back the request's KV blocks and its recurrent-state slot."""
        self.kv.free(request)
        if self.state_slots is not None:
            self.state_slots.free(request.request_id)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.preempt()
        self.waiting.appendleft(request)

    def preempt_all(self) -> None:
        """Release every running request's blocks and state slots; all wait, in their admission
        order, ahead of the requests that were already waiting."""
        while self.running:
            self._preempt(self.running.pop())

    def finish(self, request: Request) -> None:
        """Forget a finished (or aborted) request and release its blocks and state slot."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def find(self, request_id: RequestId) -> Request | None:
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None
