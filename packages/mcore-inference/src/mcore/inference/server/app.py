"""The OpenAI-compatible HTTP server (aiohttp) over an engine backend.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).
With an API key, every ``/v1/`` route wants ``Authorization: Bearer KEY``; ``/health`` and
``/metrics`` stay open for probes and scrapers.

Every failure answers JSON ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
body (naming the field), 401 without the key, 404 for an unknown route or model, 405, 413 for a
body over the size limit, 500 for anything unexpected, which is logged while the server keeps
serving. A client that disconnects mid-request has its request aborted.

Streamed chunks are built from the backend's deltas (each step's new tokens and text), so a
chunk costs the same however long its completion grows. Work on text that can be long (encoding
prompts, rendering chat templates, decoding logprob tokens) runs on a few worker threads
(``text_workers``), never on the event loop that serves every other stream.

The backend is a :class:`~mcore.inference.protocols.ServingBackend` (``add_request(prompt,
params, request_id=) -> RequestStream`` and ``stats()``):
:class:`~mcore.inference.async_engine.AsyncInferenceEngine` in process, or the coordinator's
:class:`~mcore.inference.coordinator.client.InferenceClient`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

from mcore.inference.errors import InvalidRequestError
from mcore.inference.protocols import ServingBackend
from mcore.inference.request import RequestDelta, RequestOutput
from mcore.inference.sampling import SamplingParams
from mcore.inference.server import protocol
from mcore.inference.streams import RequestStream
from mcore.inference.tokenizer import TextTokenizer, encode_chat

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20


Backend = ServingBackend
"""What the server sends requests to (:class:`mcore.inference.protocols.ServingBackend`)."""


def _speculation_lines(stats: dict[str, Any]) -> list[str]:
    """Speculative decoding in Prometheus' text format: drafted and accepted tokens (in all and
    by draft position), the acceptance rate and the tokens a verifying step produces."""
    if not stats.get("spec_drafted_per_position"):
        return []
    lines = _counter(
        "mcore_spec_decode_draft_tokens_total", "Drafted tokens sent to verification.",
        stats["spec_draft_tokens"],
    )  # fmt: skip
    lines += _counter(
        "mcore_spec_decode_accepted_tokens_total", "Drafted tokens the model accepted.",
        stats["spec_accepted_tokens"],
    )  # fmt: skip
    name = "mcore_spec_decode_accepted_tokens_per_position_total"
    lines += [
        f"# HELP {name} Accepted drafts by draft position (position k: MTP depth k).",
        f"# TYPE {name} counter",
    ]
    for k, accepted in enumerate(stats["spec_accepted_per_position"], start=1):
        lines.append(f'{name}{{position="{k}"}} {accepted}')
    for key, help_text in (
        ("spec_acceptance_rate", "Share of drafted tokens accepted."),
        ("spec_tokens_per_verify_step", "Tokens a request produces per verifying step."),
    ):
        lines += [
            f"# HELP mcore_{key} {help_text}",
            f"# TYPE mcore_{key} gauge",
            f"mcore_{key} {stats[key]}",
        ]
    return lines


def json_error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


@dataclass
class ServerMetrics:
    """Counters behind ``/metrics``."""

    http_requests: Counter = field(default_factory=Counter)
    """``(path, status) -> count``."""
    requests_finished: Counter = field(default_factory=Counter)
    """``finish_reason -> count``."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    e2e_sum: float = 0.0
    e2e_count: int = 0

    def record(self, out: RequestOutput) -> None:
        self.requests_finished[out.finish_reason or "unknown"] += 1
        self.prompt_tokens += len(out.prompt_token_ids)
        self.generation_tokens += len(out.token_ids)
        m = out.metrics
        if m is not None and m.first_token_time is not None:
            self.ttft_sum += m.first_token_time - m.arrival_time
            self.ttft_count += 1
        if m is not None and m.finished_time is not None:
            self.e2e_sum += m.finished_time - m.arrival_time
            self.e2e_count += 1


class OpenAIServer:
    """The HTTP front end of one served model."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: TextTokenizer | None,
        *,
        model_name: str,
        api_key: str | None = None,
        max_sequence_length: int | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        text_workers: int = 2,
    ) -> None:
        self.backend = backend
        self.max_body_bytes = max_body_bytes
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_sequence_length = max_sequence_length
        self.metrics = ServerMetrics()
        self.started = protocol.now()
        self.text_workers = text_workers
        """Threads that encode prompts and decode logprob tokens, off the event loop."""
        self._text_pool: ThreadPoolExecutor | None = None

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._count, self._errors, self._auth], client_max_size=self.max_body_bytes
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.on_cleanup.append(self._close_text_pool)
        return app

    # -- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def _count(self, request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        self.metrics.http_requests[(path, response.status)] += 1
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = (
                exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
            )
            return json_error(exc.status, message, _KINDS.get(exc.status, "error"))
        except _EngineFailure as exc:
            return json_error(500, str(exc), "engine_error")
        except InvalidRequestError as exc:
            return json_error(400, str(exc), "invalid_request_error", exc.field)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("request %s %s failed", request.method, request.path)
            return json_error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return json_error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "authentication_error",
                )
        return await handler(request)

    # -- simple routes ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """The backend's own state (``status`` ``ok`` with 200, else 503 and why)."""
        probe = getattr(self.backend, "health", None)
        if probe is None:
            return web.json_response({"status": "ok"})
        try:
            state = await asyncio.wait_for(probe(), timeout=5.0)
        except Exception as exc:  # a backend that cannot answer is not healthy
            state = {"status": "unavailable", "error": str(exc) or type(exc).__name__}
        return web.json_response(state, status=200 if state.get("status") == "ok" else 503)

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "mcore",
            "max_model_len": self.max_sequence_length,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def prometheus(self, request: web.Request) -> web.Response:
        m = self.metrics
        lines = [
            "# HELP mcore_http_requests_total HTTP requests by route and status.",
            "# TYPE mcore_http_requests_total counter",
        ]
        for (path, status), count in sorted(m.http_requests.items()):
            lines.append(f'mcore_http_requests_total{{path="{path}",status="{status}"}} {count}')
        lines += [
            "# HELP mcore_requests_finished_total Generation requests by finish reason.",
            "# TYPE mcore_requests_finished_total counter",
        ]
        for reason, count in sorted(m.requests_finished.items()):
            lines.append(f'mcore_requests_finished_total{{finish_reason="{reason}"}} {count}')
        lines += _counter("mcore_prompt_tokens_total", "Prompt tokens served.", m.prompt_tokens)
        lines += _counter("mcore_generation_tokens_total", "Tokens generated.", m.generation_tokens)
        lines += _summary(
            "mcore_time_to_first_token_seconds", "Time to first token.", m.ttft_sum, m.ttft_count
        )
        lines += _summary(
            "mcore_e2e_request_latency_seconds", "Request latency.", m.e2e_sum, m.e2e_count
        )
        try:
            stats = await asyncio.wait_for(self.backend.stats(), timeout=5.0)
        except Exception as exc:  # metrics must answer even when the backend does not
            log.warning("backend stats unavailable: %s", exc)
            stats = {}
        gauges = {
            "running": "Requests running.",
            "waiting": "Requests waiting.",
            "kv_cache_usage": "Fraction of KV-cache blocks in use.",
            "state_slots_in_use": "Recurrent-state slots held by running requests (hybrid models).",
            "recurrent_state_bytes": "Bytes of the recurrent-state tensors (hybrid models).",
            "engines_alive": "Engine ranks alive.",
        }
        for key, help_text in gauges.items():
            if key in stats:
                name = f"mcore_{key}" + ("_ratio" if key == "kv_cache_usage" else "")
                lines += [
                    f"# HELP {name} {help_text}",
                    f"# TYPE {name} gauge",
                    f"{name} {stats[key]}",
                ]
        for key in ("preemptions", "prefix_cache_hit_tokens"):
            if key in stats:
                lines += _counter(f"mcore_{key}_total", key.replace("_", " ") + ".", stats[key])
        lines += _speculation_lines(stats)
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # -- generation ---------------------------------------------------------------------------

    def _check_model(self, model: Any) -> None:
        if model is not None and model != self.model_name:
            raise web.HTTPNotFound(
                text=f"the model {model!r} does not exist; this server serves {self.model_name!r}"
            )

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the text worker threads: encoding, chat templates and decoding
        take time that grows with the text, and the event loop serves every other stream."""
        if self._text_pool is None:
            self._text_pool = ThreadPoolExecutor(
                max_workers=self.text_workers, thread_name_prefix="mcore-text"
            )
        return await asyncio.get_running_loop().run_in_executor(self._text_pool, fn, *args)

    async def _close_text_pool(self, app: web.Application) -> None:
        if self._text_pool is not None:
            self._text_pool.shutdown(wait=False, cancel_futures=True)
            self._text_pool = None

    def _encode(self, prompts: list[list[int] | str]) -> list[list[int]]:
        if all(isinstance(p, list) for p in prompts):
            return cast("list[list[int]]", prompts)
        if self.tokenizer is None:
            raise InvalidRequestError(
                "this model has no tokenizer: send the prompt as token ids", field="prompt"
            )
        return [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None

    async def _open(
        self, prompts: list[list[int]], params: list[SamplingParams], n: int, base_id: str
    ) -> list[RequestStream]:
        """Submit every choice; if one is refused, the others are aborted and it raises."""
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(params):
                ids = prompts[i // n]
                streams.append(await self.backend.add_request(ids, p, request_id=f"{base_id}-{i}"))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = protocol.parse_completion(await self._body(request))
        self._check_model(parsed.model)
        prompts = await self._off_loop(self._encode, parsed.prompts)
        base_id = protocol.new_id("cmpl")
        streams = await self._open(prompts, parsed.params, parsed.n, base_id)

        def choice(index: int, out: RequestOutput | RequestDelta, text: str, offset: int):
            """A whole choice (``out`` an output), or the piece of one that ``out``, a delta
            whose text begins at character ``offset``, adds."""
            lp = None
            if parsed.want_logprobs and self.tokenizer is not None:
                lp = protocol.completion_logprobs(self.tokenizer, out, offset)
            made = {
                "index": index,
                "text": text,
                "logprobs": lp,
                "finish_reason": protocol.finish_reason(out),
            }
            if parsed.return_token_ids:
                made["token_ids"] = list(out.token_ids)
                if isinstance(out, RequestOutput):
                    made["prompt_token_ids"] = list(out.prompt_token_ids)
            return made

        envelope = {"id": base_id, "object": "text_completion", "model": self.model_name}
        if parsed.stream:
            return await self._stream(request, streams, envelope, parsed, choice)
        outs = await self._collect(streams)

        def body() -> dict[str, Any]:
            return {
                **envelope,
                "created": protocol.now(),
                "choices": [choice(i, out, self._text(out), 0) for i, out in enumerate(outs)],
                "usage": self._usage(outs, parsed.n),
            }

        return web.json_response(await self._off_loop(body))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        parsed, messages = protocol.parse_chat(await self._body(request))
        self._check_model(parsed.model)
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, which chat needs")
        prompts = [await self._off_loop(encode_chat, self.tokenizer, messages)]
        base_id = protocol.new_id("chatcmpl")
        streams = await self._open(prompts, parsed.params, parsed.n, base_id)

        def logprobs(out: RequestOutput | RequestDelta):
            if not parsed.want_logprobs:
                return None
            return protocol.chat_logprobs(self.tokenizer, out)

        if parsed.stream:
            first: set[int] = set()

            def chunk(index: int, delta: RequestDelta, text: str, offset: int):
                content: dict[str, Any] = {"content": text} if text else {}
                if index not in first:
                    first.add(index)
                    content = {"role": "assistant", "content": text}
                return {
                    "index": index,
                    "delta": content,
                    "logprobs": logprobs(delta),
                    "finish_reason": protocol.finish_reason(delta),
                }

            envelope = {"id": base_id, "object": "chat.completion.chunk", "model": self.model_name}
            return await self._stream(request, streams, envelope, parsed, chunk)
        outs = await self._collect(streams)

        def body() -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self._text(out)},
                    "logprobs": logprobs(out),
                    "finish_reason": out.finish_reason,
                }
                for i, out in enumerate(outs)
            ]
            return {
                "id": base_id,
                "object": "chat.completion",
                "created": protocol.now(),
                "model": self.model_name,
                "choices": choices,
                "usage": self._usage(outs, parsed.n),
            }

        return web.json_response(await self._off_loop(body))

    # -- helpers ------------------------------------------------------------------------------

    def _text(self, out: RequestOutput) -> str:
        """A whole output's text (decoded here if the backend sent none: off the loop)."""
        if out.text is not None:
            return out.text
        if self.tokenizer is not None:
            return self.tokenizer.decode(out.token_ids)
        return ""

    def _usage(self, outs: list[RequestOutput], n: int) -> dict[str, int]:
        prompt = sum(len(out.prompt_token_ids) for out in outs[::n])
        return protocol.usage(prompt, sum(len(out.token_ids) for out in outs))

    async def _collect(self, streams: list[RequestStream]) -> list[RequestOutput]:
        try:
            outs = await asyncio.gather(*(stream.final() for stream in streams))
        finally:
            for stream in streams:
                await stream.aclose()
        for out in outs:
            self.metrics.record(out)
        failed = [out for out in outs if out.finish_reason == "error"]
        if failed:
            raise _EngineFailure(failed[0].error or "the request failed")
        return outs

    async def _stream(
        self,
        request: web.Request,
        streams: list[RequestStream],
        envelope: dict[str, Any],
        parsed: protocol.ParsedRequest,
        make_choice: Callable[..., dict[str, Any]],
    ) -> web.StreamResponse:
        """Server-sent events: one chunk per delta of each choice (its new text and tokens),
        then ``[DONE]``. The work per chunk is that of the delta, however long the choice."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        events: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for delta in stream:
                    await events.put((index, delta))
            except Exception as exc:
                await events.put((index, exc))
            finally:
                await events.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        sent_chars = [0] * len(streams)
        finals: list[RequestOutput | None] = [None] * len(streams)
        open_streams = len(streams)

        async def send(data: Any) -> None:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())

        try:
            while open_streams:
                index, item = await events.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, Exception):
                    await send(_error_event(str(item), "internal_error"))
                    continue
                text = item.text or ""
                if item.finish_reason == "error":
                    await send(_error_event(item.error, "engine_error"))
                elif text or item.token_ids or item.finished:
                    args = (index, item, text, sent_chars[index])
                    # Logprobs name each token by its text: a decode, so off the loop.
                    choice = (
                        await self._off_loop(make_choice, *args)
                        if parsed.want_logprobs
                        else make_choice(*args)
                    )
                    await send({**envelope, "created": protocol.now(), "choices": [choice]})
                sent_chars[index] += len(text)
                if item.finished:
                    finals[index] = streams[index].output()
                    self.metrics.record(finals[index])
            if parsed.include_usage:
                done = [out for out in finals if out is not None]
                await send(
                    {
                        **envelope,
                        "created": protocol.now(),
                        "choices": [],
                        "usage": self._usage(done, parsed.n),
                    }
                )
            await response.write(b"data: [DONE]\n\n")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in streams:
                await stream.aclose()
        return response


def _error_event(message: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": 500}}


class _EngineFailure(Exception):
    """A request the engine accepted failed (its rank died, a step failed)."""


def _counter(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]


def _summary(name: str, help_text: str, total: float, count: int) -> list[str]:
    return [
        f"# HELP {name} {help_text}",
        f"# TYPE {name} summary",
        f"{name}_sum {total}",
        f"{name}_count {count}",
    ]


def bind_socket(host: str, port: int | None) -> socket.socket:
    """A listening TCP socket on ``host``; port None or 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port or 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def run_http_server(
    server: OpenAIServer,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready: Callable[[str], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set; ``ready(url)`` is called once the port is bound."""
    # handler_cancellation: a client that hangs up cancels its handler, which aborts the work.
    runner = web.AppRunner(
        server.app(), access_log=None, handle_signals=False, handler_cancellation=True
    )
    await runner.setup()
    sock = bind_socket(host, port)
    site = web.SockSite(runner, sock)
    await site.start()
    bound = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
    try:
        if ready is not None:
            result = ready(url)
            if asyncio.iscoroutine(result):
                await result
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


__all__ = ["OpenAIServer", "ServerMetrics", "bind_socket", "run_http_server"]
