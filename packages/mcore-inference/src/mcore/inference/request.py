"""A request's state inside the engine, the :class:`RequestDelta` it reports each step, and
the :class:`RequestOutput` its deltas add up to.

A request's tokens are its prompt followed by what it generated; ``num_computed_tokens`` of
them have their keys/values in the KV cache. A step computes the next chunk of the rest (a
prefill chunk, or the one newest token when decoding); when a step reaches the last token, the
request samples a new one. Preemption sets ``num_computed_tokens`` back to 0 and keeps the
generated tokens, which are then recomputed like prompt tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from mcore.inference.errors import RequestId
from mcore.inference.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from mcore.inference.tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    """Queued: not admitted yet, or preempted and waiting to be recomputed."""
    RUNNING = "running"
    """Holds KV-cache blocks and is scheduled every step."""
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Timestamps (``time.monotonic()``) and counters of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    """Times the request lost its KV cache to others and was recomputed."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache when it was first admitted."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RequestDelta:
    """What one step added to a request: its new tokens and text, never its history.

    ``engine.step()`` returns these, and request streams yield them, so the work of reporting
    a token does not grow with the length of the request. An :class:`OutputCollector` joins a
    request's deltas into its complete :class:`RequestOutput`.
    """

    request_id: RequestId
    token_ids: list[int]
    """The tokens generated since the previous delta (a stop token that ended the request
    included); empty in a delta that only finishes the request (an abort)."""
    num_generated: int
    """Tokens generated so far, these included."""
    logprobs: list[float] | None = None
    """Log-probability of each of ``token_ids``, when the request asked."""
    top_logprobs: list[dict[int, float]] | None = None
    """The top alternatives of each of ``token_ids``, when the request asked."""
    text: str | None = None
    """The text that became final since the previous delta (with a tokenizer). The last
    characters that could still begin a stop string are held back until they cannot, so the
    pieces join into exactly the request's text, cut before its stop string."""
    finished: bool = False
    finish_reason: str | None = None
    """``stop`` (a stop token or string), ``length`` (max_tokens or max_sequence_length),
    ``abort``, or ``error``."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request."""
    error: str | None = None
    """Why the request failed, when ``finish_reason`` is ``error``."""
    metrics: RequestMetrics | None = None
    """Set on the finished delta only."""
    prompt_token_ids: list[int] | None = None
    """Set on a request's first delta only (the engine's own list: do not change it)."""
    engine_rank: int | None = None
    """The data-parallel rank that served the request (through the coordinator)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (msgpack-ready); top-logprob keys become strings for JSON too."""
        out = dict(self.__dict__)
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        out["top_logprobs"] = _top_pairs(self.top_logprobs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestDelta:
        """The inverse of :meth:`to_dict`; fields it does not name are ignored."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields.setdefault("token_ids", [])
        fields.setdefault("num_generated", len(fields["token_ids"]))
        metrics = fields.pop("metrics", None)
        top = fields.pop("top_logprobs", None)
        return cls(
            **fields,
            metrics=RequestMetrics(**metrics) if metrics else None,
            top_logprobs=_top_dicts(top),
        )


@dataclass
class RequestOutput:
    """Everything one request generated: what ``engine.generate()`` returns, and what
    :class:`OutputCollector` assembles from the request's deltas."""

    request_id: RequestId
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens (a stop token, when one ended the request, included)."""
    logprobs: list[float] | None = None
    """Log-probability of each generated token under the model, when the request asked."""
    top_logprobs: list[dict[int, float]] | None = None
    """The top alternatives of each generated token, when the request asked for them."""
    text: str | None = None
    """The generated text (with a tokenizer), cut before a stop string."""
    finished: bool = False
    finish_reason: str | None = None
    """``stop`` (a stop token or string), ``length`` (max_tokens or max_sequence_length),
    ``abort``, or ``error``."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request."""
    error: str | None = None
    """Why the request failed, when ``finish_reason`` is ``error``."""
    metrics: RequestMetrics | None = None
    engine_rank: int | None = None
    """The data-parallel rank that served the request (through the coordinator)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (msgpack-ready); top-logprob keys become strings for JSON too."""
        out = dict(self.__dict__)
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        out["top_logprobs"] = _top_pairs(self.top_logprobs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestOutput:
        data = dict(data)
        metrics = data.pop("metrics", None)
        top = data.pop("top_logprobs", None)
        out = cls(**data)
        out.metrics = RequestMetrics(**metrics) if metrics else None
        out.top_logprobs = _top_dicts(top)
        return out


def _top_pairs(top: list[dict[int, float]] | None) -> list[list[list[float]]] | None:
    """Top logprobs as ``[[id, logprob], ...]`` per token: msgpack and JSON keep int ids."""
    if top is None:
        return None
    return [[[int(k), float(v)] for k, v in alternatives.items()] for alternatives in top]


def _top_dicts(top: list[list[list[float]]] | None) -> list[dict[int, float]] | None:
    if top is None:
        return None
    return [{int(k): float(v) for k, v in pairs} for pairs in top]


class OutputCollector:
    """Joins one request's deltas into its :class:`RequestOutput`, in time proportional to
    the deltas (lists are extended, text pieces joined once, by :meth:`output`).

    Driving the engine by hand::

        collectors = defaultdict(OutputCollector)
        while engine.has_unfinished_requests():
            for delta in engine.step():
                collectors[delta.request_id].add(delta)
        outputs = {rid: c.output() for rid, c in collectors.items()}

    The request id and prompt come from the first delta, or are given here.
    """

    def __init__(
        self, request_id: RequestId | None = None, prompt_token_ids: list[int] | None = None
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = None
        self.top_logprobs: list[dict[int, float]] | None = None
        self._text: list[str] | None = None
        self.last: RequestDelta | None = None
        """The latest delta (its scalars: finished, finish_reason, engine_rank...)."""

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def add(self, delta: RequestDelta) -> None:
        if self.request_id is None:
            self.request_id = delta.request_id
        if self.prompt_token_ids is None and delta.prompt_token_ids is not None:
            self.prompt_token_ids = delta.prompt_token_ids
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.top_logprobs is not None:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs.extend(delta.top_logprobs)
        if delta.text is not None:
            if self._text is None:
                self._text = []
            self._text.append(delta.text)
        self.last = delta

    def output(self) -> RequestOutput:
        """The request's output so far (complete once :attr:`finished`); a fresh copy."""
        last = self.last
        return RequestOutput(
            request_id=cast("RequestId", self.request_id),  # None only before any delta
            prompt_token_ids=list(self.prompt_token_ids or ()),
            token_ids=list(self.token_ids),
            logprobs=None if self.logprobs is None else list(self.logprobs),
            top_logprobs=None if self.top_logprobs is None else list(self.top_logprobs),
            text=None if self._text is None else "".join(self._text),
            finished=self.finished,
            finish_reason=last.finish_reason if last else None,
            stop_reason=last.stop_reason if last else None,
            error=last.error if last else None,
            metrics=last.metrics if last else None,
            engine_rank=last.engine_rank if last else None,
        )


class Request:
    """The engine's record of one request."""

    def __init__(
        self,
        request_id: RequestId,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        max_new_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        generator: torch.Generator | None = None,
        detokenizer: IncrementalDetokenizer | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_new_tokens = max_new_tokens
        """Generated tokens at most: max_tokens, or what max_sequence_length leaves."""
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= eos_token_ids
        self.stop_token_ids = frozenset(stop_ids)
        self.generator = generator
        self.detokenizer = detokenizer
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.draft: list[int] = []
        """Tokens proposed to follow (speculative decoding), verified by the next step."""
        self.draft_probs: Any = None
        """``[len(draft), vocab]`` the distributions the drafts were sampled from (sampled
        requests; None for greedy ones): rejection sampling needs them."""
        self._num_reported = 0
        """Generated tokens already handed out in deltas."""
        self._reported = False

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token: int, logprob: float | None, top: dict[int, float] | None) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.all_token_ids.append(token)
        self.output_token_ids.append(token)
        if self.logprobs is not None:
            assert logprob is not None  # sampled for every request that asks for logprobs
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top or {})
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        stop_string = None
        if self.detokenizer is not None:
            stop_string = self.detokenizer.add(token, special=token in self.stop_token_ids)
        if token in self.stop_token_ids:
            self.finish("stop", token)
        elif stop_string is not None:
            self.finish("stop", stop_string)
        elif len(self.output_token_ids) >= self.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None, error: str | None = None):
        self.status = RequestStatus.FINISHED
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error
        self.metrics.finished_time = time.monotonic()

    def preempt(self) -> None:
        """Lose the KV cache; the tokens so far are recomputed when readmitted."""
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.metrics.num_preemptions += 1
        self.clear_draft()

    def clear_draft(self) -> None:
        self.draft, self.draft_probs = [], None

    def take_delta(self) -> RequestDelta:
        """What the request produced since its previous delta; the first one carries the
        prompt, the finished one the metrics and the text held back until then."""
        start, self._num_reported = self._num_reported, len(self.output_token_ids)
        first, self._reported = not self._reported, True
        text = None
        if self.detokenizer is not None:
            text = self.detokenizer.take(final=self.finished)
        return RequestDelta(
            request_id=self.request_id,
            token_ids=self.output_token_ids[start:],
            num_generated=self._num_reported,
            logprobs=None if self.logprobs is None else self.logprobs[start:],
            top_logprobs=None if self.top_logprobs is None else self.top_logprobs[start:],
            text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
            metrics=RequestMetrics(**self.metrics.__dict__) if self.finished else None,
            prompt_token_ids=self.prompt_token_ids if first else None,
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"generated={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
            f"{self.status.value})"
        )
