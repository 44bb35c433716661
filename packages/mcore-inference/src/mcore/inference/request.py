"""A request's state inside the engine, and the :class:`RequestOutput` the engine reports.

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
from typing import TYPE_CHECKING, Any

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
class RequestOutput:
    """A snapshot of one request: what it generated so far, and whether it is done."""

    request_id: RequestId
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens so far (a stop token, when one ended the request, included)."""
    logprobs: list[float] | None = None
    """Log-probability of each generated token under the model, when the request asked."""
    top_logprobs: list[dict[int, float]] | None = None
    """The top alternatives of each generated token, when the request asked for them."""
    text: str | None = None
    """The generated text (with a tokenizer): cut before a stop string; while running, the
    last characters that could still begin a stop string are held back."""
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
        if self.top_logprobs is not None:
            out["top_logprobs"] = [
                [[int(k), float(v)] for k, v in top.items()] for top in self.top_logprobs
            ]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestOutput:
        data = dict(data)
        metrics = data.pop("metrics", None)
        top = data.pop("top_logprobs", None)
        out = cls(**data)
        out.metrics = RequestMetrics(**metrics) if metrics else None
        if top is not None:
            out.top_logprobs = [{int(k): float(v) for k, v in pairs} for pairs in top]
        return out


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

    def output(self) -> RequestOutput:
        text = None
        if self.detokenizer is not None:
            text = (
                self.detokenizer.final_text() if self.finished else self.detokenizer.stable_text()
            )
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids),
            logprobs=None if self.logprobs is None else list(self.logprobs),
            top_logprobs=None if self.top_logprobs is None else list(self.top_logprobs),
            text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
            metrics=RequestMetrics(**self.metrics.__dict__),
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"generated={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
            f"{self.status.value})"
        )
