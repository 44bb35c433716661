"""The OpenAI HTTP API's request bodies, checked, and its response objects.

A body is checked field by field; the first bad one raises ``InvalidRequestError`` naming it
(the server answers 400 with ``param`` set). Fields of the OpenAI API this server does not
implement are refused when given a non-default value rather than silently ignored; unknown
fields are ignored, as OpenAI-compatible servers commonly do. vLLM's extensions ``top_k``,
``min_p``, ``stop_token_ids``, ``ignore_eos`` and ``skip_special_tokens`` are accepted, and
``num_speculative_tokens`` (drafted tokens per step for this request; 0 turns speculation off).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from mcore.inference.errors import InvalidRequestError
from mcore.inference.request import RequestDelta, RequestOutput
from mcore.inference.sampling import SamplingParams

MAX_N = 16
"""Choices per request at most."""
MAX_LOGPROBS = 20


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field(body: dict[str, Any], name: str, check, rule: str, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not check(value):
        raise InvalidRequestError(f"'{name}' {rule}, got {value!r:.100}", field=name)
    return value


def _refuse_unsupported(body: dict[str, Any], defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        value = body.get(name)
        if value is not None and value != default:
            raise InvalidRequestError(
                f"'{name}' is not supported by this server (got {value!r:.100})", field=name
            )


@dataclass
class ParsedRequest:
    """What a completion or chat request asks for, in the engine's terms."""

    prompts: list[list[int] | str]
    """Token ids, or text still to be encoded."""
    params: list[SamplingParams]
    """One per choice (``n`` per prompt; seeds offset per choice)."""
    n: int
    stream: bool
    include_usage: bool
    model: str | None
    want_logprobs: bool
    top_logprobs: int
    return_token_ids: bool = False
    """Completions only: each choice also carries its ``token_ids`` (and, unstreamed, the
    ``prompt_token_ids``), as vLLM's ``return_token_ids``; clients that tokenise themselves
    (RL rollouts, servers of tokenizer-less checkpoints) read ids instead of text."""


def _sampling(body: dict[str, Any], *, max_tokens: int | None, logprobs: int | None):
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequestError("'stop' must be a string or a list of strings", field="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(_is_int(t) for t in stop_ids)):
        raise InvalidRequestError("'stop_token_ids' must be a list of ints", field="stop_token_ids")
    return dict(
        max_tokens=max_tokens,
        temperature=_field(body, "temperature", _is_number, "must be a number", 1.0),
        top_p=_field(body, "top_p", _is_number, "must be a number", 1.0),
        top_k=_field(body, "top_k", _is_int, "must be an integer", 0),
        min_p=_field(body, "min_p", _is_number, "must be a number", 0.0),
        seed=_field(body, "seed", _is_int, "must be an integer"),
        stop=stop or (),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=_field(
            body, "ignore_eos", lambda v: isinstance(v, bool), "must be a bool", False
        ),
        skip_special_tokens=_field(
            body, "skip_special_tokens", lambda v: isinstance(v, bool), "must be a bool", True
        ),
        logprobs=logprobs,
        num_speculative_tokens=_field(
            body,
            "num_speculative_tokens",
            lambda v: _is_int(v) and v >= 0,
            "must be an integer >= 0",
        ),
    )


def _choices(prompts: list, base: dict[str, Any], n: int) -> list[SamplingParams]:
    out = []
    for _ in prompts:
        for j in range(n):
            seed = base["seed"]
            out.append(SamplingParams(**{**base, "seed": None if seed is None else seed + j}))
    return out


def _common(body: dict[str, Any]) -> tuple[int, bool, bool]:
    n = _field(body, "n", lambda v: _is_int(v) and 1 <= v <= MAX_N, f"must be in [1, {MAX_N}]", 1)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "must be a bool", False)
    options = _field(body, "stream_options", lambda v: isinstance(v, dict), "must be an object", {})
    include_usage = bool(options.get("include_usage", False))
    return n, stream, include_usage


def _max_tokens(body: dict[str, Any], *names: str, default: int | None) -> int | None:
    for name in names:
        if body.get(name) is not None:
            return _field(body, name, _is_int, "must be an integer")
    return default


def parse_completion(body: Any) -> ParsedRequest:
    """``POST /v1/completions``."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    _refuse_unsupported(
        body,
        {
            "echo": False,
            "suffix": None,
            "best_of": 1,
            "logit_bias": None,
            "presence_penalty": 0,
            "frequency_penalty": 0,
        },
    )
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
    ):
        prompts: list = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p))
            for p in prompt
        )
    ):
        prompts = list(prompt)
    else:
        raise InvalidRequestError(
            "'prompt' must be a non-empty string, list of strings, list of token ids or list of "
            "lists of token ids",
            field="prompt",
        )
    n, stream, include_usage = _common(body)
    logprobs = _field(
        body,
        "logprobs",
        lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
        f"must be an integer in [0, {MAX_LOGPROBS}]",
    )
    base = _sampling(
        body, max_tokens=_max_tokens(body, "max_tokens", default=16), logprobs=logprobs
    )
    return ParsedRequest(
        prompts,
        _choices(prompts, base, n),
        n,
        stream,
        include_usage,
        body.get("model"),
        logprobs is not None,
        logprobs or 0,
        _field(body, "return_token_ids", lambda v: isinstance(v, bool), "must be a bool", False),
    )


def parse_chat(body: Any) -> tuple[ParsedRequest, list[dict[str, Any]]]:
    """``POST /v1/chat/completions``: the parsed request (prompt still to render) and the
    messages."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    _refuse_unsupported(
        body,
        {
            "tools": None,
            "tool_choice": None,
            "functions": None,
            "function_call": None,
            "response_format": None,
            "logit_bias": None,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "audio": None,
        },
    )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list", field="messages")
    n, stream, include_usage = _common(body)
    want = _field(body, "logprobs", lambda v: isinstance(v, bool), "must be a bool", False)
    top = _field(
        body,
        "top_logprobs",
        lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
        f"must be an integer in [0, {MAX_LOGPROBS}]",
        0,
    )
    if top and not want:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", field="top_logprobs")
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens", default=None)
    base = _sampling(body, max_tokens=max_tokens, logprobs=top if want else None)
    prompts: list = [None]  # rendered later from the messages
    parsed = ParsedRequest(
        prompts,
        _choices(prompts, base, n),
        n,
        stream,
        include_usage,
        body.get("model"),
        want,
        top,
    )
    return parsed, messages


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(out: RequestOutput | RequestDelta) -> str | None:
    return out.finish_reason if out.finished else None


def token_text(tokenizer, token_id: int) -> str:
    """A token as logprobs show it (unique per id where the tokenizer can do so)."""
    own = getattr(tokenizer, "token_text", None)
    if own is not None:
        return own(token_id)
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, out: RequestOutput | RequestDelta, text_offset: int):
    """OpenAI completions ``logprobs`` of the tokens of ``out`` (a whole output, or a delta
    whose text begins at character ``text_offset`` of the completion)."""
    if out.logprobs is None:
        return None
    tokens = [token_text(tokenizer, t) for t in out.token_ids]
    offsets, pos = [], text_offset
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    tops = None
    if out.top_logprobs is not None:
        tops = [{token_text(tokenizer, k): v for k, v in top.items()} for top in out.top_logprobs]
    return {
        "tokens": tokens,
        "token_logprobs": list(out.logprobs),
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, out: RequestOutput | RequestDelta):
    """OpenAI chat ``logprobs`` (``{"content": [...]}``) of the tokens of ``out``."""
    if out.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for i, token_id in enumerate(out.token_ids):
        item = entry(token_id, out.logprobs[i])
        top = out.top_logprobs[i] if out.top_logprobs is not None else {}
        item["top_logprobs"] = [entry(k, v) for k, v in top.items()]
        content.append(item)
    return {"content": content}
