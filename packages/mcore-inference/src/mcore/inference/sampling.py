"""Per-request sampling: :class:`SamplingParams` and the batched :class:`Sampler`.

Every request carries its own parameters, so one step's batch mixes greedy and sampled rows,
different temperatures and filters. The filters apply in this order to the temperature-scaled
distribution: top-k, then top-p (over what top-k kept), then min-p (relative to the most likely
token). Sampling draws ``argmax(p / e)`` with ``e`` exponential noise; a request with a ``seed``
draws its noise from its own generator, so its tokens do not depend on what else is batched.

Log-probabilities, when asked for, are those of the model's own distribution (the raw logits,
before temperature and filters), as vLLM reports them: what RL needs for importance ratios.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mcore.inference.errors import InvalidRequestError

if TYPE_CHECKING:
    from mcore.inference.request import Request


def _as_tuple(value: Any, kind: type, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind):
        return (value,)
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidRequestError(
            f"{name} must be a {kind.__name__} or a list of them, got {value!r}", field=name
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise InvalidRequestError(
                f"{name} must hold {kind.__name__}s, got {item!r}", field=name
            )
    return items


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is decoded. Invalid values raise ``InvalidRequestError`` naming the
    field, at construction (so at submission)."""

    max_tokens: int | None = 16
    """Tokens to generate at most; None means up to the engine's max_sequence_length."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Seed of this request's own generator (reproducible whatever else is batched)."""
    stop: tuple[str, ...] = ()
    """Strings that end the generation; the text is cut before them (needs a tokenizer)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the generation (kept in token_ids, left out of the text)."""
    ignore_eos: bool = False
    """Keep generating past the tokenizer's end-of-sequence tokens."""
    logprobs: int | None = None
    """Report the log-probability of each generated token, and of this many top alternatives
    (0: only the generated token's); None reports none."""
    num_speculative_tokens: int | None = None
    """Tokens this request drafts per step with the model's MTP depths (speculative
    decoding); at most the engine's inference.num_speculative_tokens; 0 turns speculation
    off for this request; None takes the engine's."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form fields a front end passes through (not used by the engine)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(
            self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids")
        )
        self._check()

    def _check(self) -> None:
        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {rule}, got {getattr(self, name)!r}", field=name)

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer (a token budget of at least 1)")
        if not is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise bad("temperature", "must be a number >= 0")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (0 or -1 disable it)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must lie in (0, 1]")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must lie in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer")
        spec = self.num_speculative_tokens
        if spec is not None and (not is_int(spec) or spec < 0):
            raise bad("num_speculative_tokens", "must be an integer >= 0")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be an integer >= 0")
        for name in ("stop",):
            if any(not s for s in self.stop):
                raise bad(name, "must not contain empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for msgpack."""
        out = asdict(self)
        out["stop"], out["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SamplingParams:
        """The inverse of :meth:`to_dict`; unknown keys are refused by name."""
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}",
                field=unknown[0],
            )
        return cls(**data)


@dataclass
class SampleResult:
    """One step's sampled tokens, row by row."""

    token_ids: list[int]
    logprobs: list[float | None]
    """The sampled token's log-probability, for rows that asked for logprobs."""
    top_logprobs: list[dict[int, float] | None]
    """The top alternatives of rows that asked for ``logprobs > 0``."""


class Sampler:
    """Samples one token per row of ``logits`` from each row's request's parameters."""

    def __init__(self, *, device: torch.device, seed: int = 0, vocab_size: int | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.vocab_size = vocab_size
        """Ids at and above this are never sampled (the model's padded vocabulary rows)."""

    def request_generator(self, seed: int) -> torch.Generator:
        """A generator of its own for a request with a seed."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """``logits [R, V]`` (row i belongs to ``requests[i]``) -> one token per row."""
        # A copy when limited: the forward's output may be a CUDA graph's own buffer.
        logits = self.limit_vocab(logits)
        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            sampled = self._sample(logits, params, requests)
            keep_greedy = torch.tensor(greedy, device=logits.device)
            tokens = torch.where(keep_greedy, tokens, sampled)
        want = [p.logprobs for p in params]
        logprobs: list[float | None] = [None] * len(requests)
        top: list[dict[int, float] | None] = [None] * len(requests)
        if any(n is not None for n in want):
            all_logprobs = torch.log_softmax(logits, dim=-1)
            chosen = all_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            k = max(n or 0 for n in want)
            values, ids = [], []
            if k:
                values, ids = all_logprobs.topk(k, dim=-1)
                values, ids = values.tolist(), ids.tolist()
            for i, n in enumerate(want):
                if n is None:
                    continue
                logprobs[i] = chosen[i]
                if n:
                    top[i] = dict(zip(ids[i][:n], values[i][:n], strict=True))
        return SampleResult(tokens.tolist(), logprobs, top)

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], requests: Sequence[Request]
    ) -> torch.Tensor:
        return self.draw(self.probs(logits, params), requests)

    def limit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` in fp32 with the ids past ``vocab_size`` made impossible."""
        logits = logits.float()
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_size :] = float("-inf")
        return logits

    def draw(self, probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """One token per row of ``probs [R, V]``, from each request's generator (or the
        sampler's): ``argmax(p / e)`` with exponential noise ``e``."""
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(requests) if r.generator is not None]
        if len(seeded) < probs.shape[0]:
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=requests[i].generator)
        # A zero draw would turn a filtered-out token's 0 / 0 into NaN.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)

    def uniform(self, requests: Sequence[Request]) -> list[float]:
        """One uniform draw in [0, 1) per request, from its generator (or the sampler's)."""
        out = []
        for request in requests:
            generator = request.generator or self.generator
            out.append(float(torch.rand((), generator=generator, device=self.device)))
        return out

    def probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from ``[R, V]``: temperature, then top-k, top-p
        and min-p (greedy rows: temperature 1, no filter; callers take their argmax)."""
        vocab = logits.shape[-1]
        device = logits.device
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        scaled = logits / temperature[:, None]
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        if any(m > 0 for m in min_p):
            probs = torch.softmax(scaled, dim=-1)
            floor = torch.tensor(min_p, device=device)[:, None] * probs.amax(-1, keepdim=True)
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        return torch.softmax(scaled, dim=-1)


def _top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """``scaled`` with the tokens outside each row's top-k, then top-p, set to -inf."""
    device = scaled.device
    ordered, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(scaled.shape[-1], device=device)
    drop = ranks[None, :] >= torch.tensor(top_k, device=device)[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # A token is dropped once the ones before it already reach top_p (the first always stays).
    before = probs.cumsum(dim=-1) - probs
    # Rows without top-p get a threshold cumulative sums cannot reach through rounding.
    threshold = torch.tensor([p if p < 1 else 2.0 for p in top_p], device=device)
    drop = drop | (before > threshold[:, None])
    drop_in_vocab = torch.empty_like(drop).scatter_(1, order, drop)
    return scaled.masked_fill(drop_in_vocab, float("-inf"))
