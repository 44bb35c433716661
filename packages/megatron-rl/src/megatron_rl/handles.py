"""Inference handles: what agents call to generate, whatever serves the model.

Every handle offers ``generate(prompt, **generation_args) -> Generation`` (blocking) and
``await agenerate(prompt, **generation_args)`` (many at once from asyncio: agents of a whole
step run concurrently), and carries the ``tokenizer`` the agent encodes turns with.
``prompt`` is text or token ids; ``generation_args`` are ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids`` and ``ignore_eos``. A generation
returns the new tokens and the log-probability of each under the model's raw logits (before
temperature and filters, as vLLM reports them).

- :class:`EngineHandle`: an in-process :class:`~mcore.inference.DynamicInferenceEngine` (what
  ``mcore rl`` uses): concurrent ``agenerate`` calls share the engine's batches.
- :class:`CoordinatorHandle`: engine ranks behind an :class:`~mcore.inference.InferenceCoordinator`
  (ZMQ), through an :class:`~mcore.inference.InferenceClient` on a thread of its own.
- :class:`OpenAIHandle`: any OpenAI-compatible server (``mcore serve``, vLLM, SGLang) over HTTP
  ``POST /v1/completions`` with ``logprobs``.
- :class:`HFHandle`: a Hugging Face ``transformers`` causal LM and its ``generate``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from mcore.core import McoreError

if TYPE_CHECKING:
    from mcore.inference.protocols import InferenceEngine

GENERATION_ARGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)
"""The keyword arguments every handle understands."""


@dataclass
class Generation:
    """One completion: its tokens, their log-probabilities and its text."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    """New tokens (a stop token that ended the generation included)."""
    logprobs: list[float]
    """Log-probability of each new token under the serving model (raw logits)."""
    text: str
    """Text of the new tokens (stop strings and special tokens left out)."""
    finish_reason: str | None = None
    """``stop``, ``length``, ``abort`` or ``error``."""


@runtime_checkable
class InferenceHandle(Protocol):
    """What an agent generates through (see the module docstring)."""

    tokenizer: Any
    """``encode(text, add_special_tokens=...)`` and ``decode(ids)``, or None."""

    def generate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation: ...

    async def agenerate(
        self, prompt: str | Sequence[int], **generation_args: Any
    ) -> Generation: ...


def _check_args(args: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(args) - set(GENERATION_ARGS))
    if unknown:
        raise McoreError(
            f"unknown generation argument(s) {unknown}; handles take {', '.join(GENERATION_ARGS)}"
        )
    return args


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens, from any tokenizer kind
    (mcore-inference's, mcore-core's, Hugging Face's)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # mcore-core tokenizers add none and take no such argument
        return list(tokenizer.encode(text))


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids``, special tokens left out, from any tokenizer kind."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))


def _encode(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise McoreError("a text prompt needs a handle with a tokenizer; pass token ids instead")
    return encode_text(tokenizer, prompt)


def _sampling_params(args: dict[str, Any]) -> Any:
    """mcore-inference ``SamplingParams`` of generation arguments, with per-token logprobs."""
    from mcore.inference import SamplingParams

    args = dict(_check_args(args))
    for name in ("stop", "stop_token_ids"):
        if args.get(name) is not None:
            args[name] = tuple(args[name])
    return SamplingParams(logprobs=0, **{k: v for k, v in args.items() if v is not None})


def _from_output(out: Any, tokenizer: Any) -> Generation:
    """A ``Generation`` of an mcore-inference ``RequestOutput``; a failed request raises."""
    if out.finish_reason == "error":
        raise McoreError(f"generation failed in the engine: {out.error}")
    text = out.text
    if text is None:
        text = decode_ids(tokenizer, out.token_ids) if tokenizer is not None else ""
    return Generation(
        prompt_token_ids=list(out.prompt_token_ids),
        token_ids=list(out.token_ids),
        logprobs=[float(x) for x in out.logprobs],
        text=text,
        finish_reason=out.finish_reason,
    )


# -- our own engine --------------------------------------------------------------------------


class EngineHandle:
    """An in-process ``DynamicInferenceEngine``; concurrent ``agenerate`` calls are batched.

    The first ``agenerate`` in an event loop starts a driver task that steps the engine while
    any of this handle's requests is unfinished. Leaving the loop (``run_until_complete``
    returning) pauses everything, requests included, until the loop runs again: this is how
    ``mcore rl`` keeps partial rollouts in the engine across training steps.
    ``generated_tokens`` counts the tokens this handle's driver produced.
    """

    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.generated_tokens = 0
        self._waiting: dict[Any, tuple[asyncio.Future, Any]] = {}
        """Request id -> (its future, the ``OutputCollector`` joining its deltas)."""
        self._driver: asyncio.Task | None = None

    def generate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        (out,) = self.engine.generate([prompt], [_sampling_params(generation_args)])
        return _from_output(out, self.tokenizer)

    async def agenerate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        from mcore.inference.request import OutputCollector

        loop = asyncio.get_running_loop()
        rid = self.engine.add_request(prompt, _sampling_params(generation_args))
        future = loop.create_future()
        self._waiting[rid] = (future, OutputCollector())
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        return _from_output(await future, self.tokenizer)

    async def _drive(self) -> None:
        try:
            while self._waiting:
                deltas = self.engine.step()  # each request's new tokens, not its history
                self.generated_tokens += sum(len(delta.token_ids) for delta in deltas)
                for delta in deltas:
                    waiting = self._waiting.get(delta.request_id)
                    if waiting is None:
                        continue
                    future, collector = waiting
                    collector.add(delta)
                    if delta.finished:
                        del self._waiting[delta.request_id]
                        if not future.done():
                            future.set_result(collector.output())
                await asyncio.sleep(0)  # let agents add turns and the runner look at budgets
        except BaseException as exc:
            for future, _ in self._waiting.values():
                if not future.done():
                    future.set_exception(exc)
            self._waiting.clear()
            if not isinstance(exc, Exception):
                raise

    @property
    def num_in_flight(self) -> int:
        """This handle's requests still generating."""
        return len(self._waiting)


# -- engine ranks behind the ZMQ coordinator ---------------------------------------------------


class _LoopThread:
    """An asyncio event loop on a daemon thread, for clients bound to one loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()


class CoordinatorHandle:
    """Engine ranks registered with an ``InferenceCoordinator`` at ``address``.

    The ``InferenceClient`` lives on a thread of its own, so this handle is usable from any
    thread and any event loop. ``suspend()`` / ``resume()`` reach every rank.
    """

    def __init__(
        self,
        address: str,
        *,
        tokenizer: Any = None,
        wait_for_engines: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        from mcore.inference import InferenceClient

        self.address = address
        self.tokenizer = tokenizer
        self._thread = _LoopThread("mcore-rl-coordinator-client")
        client = InferenceClient(address)
        try:
            self._client = self._thread.submit(
                client.start(wait_for_engines=wait_for_engines, timeout_s=timeout_s)
            ).result(timeout_s + 5)
        except BaseException:
            self._thread.close()
            raise

    def _submit(self, prompt: str | Sequence[int], args: dict[str, Any]) -> Any:
        params = _sampling_params(args)
        return self._thread.submit(self._client.submit(_encode(self.tokenizer, prompt), params))

    def generate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        return _from_output(self._submit(prompt, generation_args).result(), self.tokenizer)

    async def agenerate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        out = await asyncio.wrap_future(self._submit(prompt, generation_args))
        return _from_output(out, self.tokenizer)

    def suspend(self) -> int:
        """Suspend every rank's engine (KV cache freed); returns how many acknowledged."""
        return self._thread.submit(self._client.suspend()).result()

    def resume(self) -> int:
        return self._thread.submit(self._client.resume()).result()

    def close(self) -> None:
        """Disconnect (the engine ranks keep running)."""
        try:
            self._thread.submit(self._client.close()).result(timeout=10)
        finally:
            self._thread.close()


# -- any OpenAI-compatible server ------------------------------------------------------------

_TOKEN_ID = re.compile(r"token_id:(\d+)")


class OpenAIHandle:
    """An OpenAI-compatible server at ``base_url`` (``http://127.0.0.1:8000``), through
    ``POST /v1/completions`` with ``logprobs: 0`` (stdlib HTTP; ``agenerate`` runs requests
    on a pool of ``concurrency`` threads).

    Token ids: the request asks for vLLM's ``return_tokens_as_token_ids`` (tokens come back
    as ``token_id:123``); a server that answers with token strings instead (``mcore serve``,
    OpenAI) needs ``tokenizer``, whose vocabulary maps each string back to its id
    (``token_text(id)`` where the tokenizer has it, else ``decode([id])``); a string that two
    ids share is an error rather than a guess.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        tokenizer: Any = None,
        timeout_s: float = 120.0,
        concurrency: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="mcore-rl-http")
        self._ids_by_text: dict[str, int] | None = None

    def _body(self, prompt: str | Sequence[int], args: dict[str, Any]) -> dict[str, Any]:
        args = _check_args(dict(args))
        body: dict[str, Any] = {
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "max_tokens": args.get("max_tokens", 16),
            "temperature": args.get("temperature", 1.0),
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        if self.model is not None:
            body["model"] = self.model
        for name, default in (("top_p", 1.0), ("seed", None), ("stop", None)):
            if args.get(name, default) != default:
                body[name] = list(args[name]) if name == "stop" else args[name]
        # vLLM's extensions: sent only when used, so plain OpenAI servers are not confused.
        for name, default in (("top_k", 0), ("stop_token_ids", None), ("ignore_eos", False)):
            if args.get(name, default) not in (default, None, ()):
                body[name] = list(args[name]) if name == "stop_token_ids" else args[name]
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise McoreError(
                f"{self.base_url}/v1/completions answered {exc.code}: {detail}"
            ) from None
        except urllib.error.URLError as exc:
            raise McoreError(f"cannot reach {self.base_url}: {exc.reason}") from None

    def _token_id(self, token: str) -> int:
        found = _TOKEN_ID.fullmatch(token)
        if found:
            return int(found.group(1))
        if self.tokenizer is None:
            raise McoreError(
                f"the server at {self.base_url} returned token strings ({token!r}), not ids: give "
                "OpenAIHandle the model's tokenizer to map them back"
            )
        if self._ids_by_text is None:
            self._ids_by_text = self._vocabulary()
        if token not in self._ids_by_text:
            raise McoreError(
                f"token {token!r} from {self.base_url} is not one token of the handle's "
                "tokenizer, or several ids share its text; use a server that returns token ids "
                "(vLLM's return_tokens_as_token_ids)"
            )
        return self._ids_by_text[token]

    def _vocabulary(self) -> dict[str, int]:
        tok = self.tokenizer
        text_of = getattr(tok, "token_text", None) or (
            lambda i: tok.decode([i], skip_special_tokens=False)
        )
        seen: dict[str, int] = {}
        shared: set[str] = set()
        for i in range(int(tok.vocab_size)):
            text = text_of(i)
            if text in seen:
                shared.add(text)
            seen[text] = i
        return {t: i for t, i in seen.items() if t not in shared}

    def generate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        if isinstance(prompt, str) and self.tokenizer is not None:
            prompt = _encode(self.tokenizer, prompt)
        reply = self._post(self._body(prompt, generation_args))
        try:
            choice = reply["choices"][0]
            logprobs = choice["logprobs"]
            tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise McoreError(
                f"{self.base_url} answered without per-token logprobs: {str(reply)[:300]}"
            ) from None
        return Generation(
            prompt_token_ids=[] if isinstance(prompt, str) else list(prompt),
            token_ids=[self._token_id(t) for t in tokens],
            logprobs=[float(v) for v in values],
            text=choice.get("text", ""),
            finish_reason=choice.get("finish_reason"),
        )

    async def agenerate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: self.generate(prompt, **generation_args)
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# -- a Hugging Face model --------------------------------------------------------------------


class HFHandle:
    """A ``transformers`` causal LM: ``model.generate`` one prompt at a time, with the raw
    logits of each step turned into the new tokens' log-probabilities.

    ``tokenizer`` is a ``transformers`` tokenizer (or anything with ``encode``/``decode``);
    ``eos_token_ids`` default to the model's generation config. Stop strings are not
    supported (``transformers`` needs the tokenizer object for them); stop token ids are.
    """

    def __init__(
        self, model: Any, tokenizer: Any = None, *, eos_token_ids: Sequence[int] | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(model.generation_config, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = list(eos_token_ids)
        self._lock = threading.Lock()

    @torch.no_grad()
    def generate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        args = _check_args(dict(generation_args))
        if args.get("stop"):
            raise McoreError("HFHandle does not support stop strings; use stop_token_ids")
        ids = _encode(self.tokenizer, prompt)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        temperature = float(args.get("temperature", 1.0))
        eos = [*self.eos_token_ids, *(args.get("stop_token_ids") or ())]
        if args.get("ignore_eos"):
            eos = list(args.get("stop_token_ids") or ())
        kwargs: dict[str, Any] = dict(
            max_new_tokens=int(args.get("max_tokens", 16)),
            do_sample=temperature > 0,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
            output_logits=True,
            return_dict_in_generate=True,
            attention_mask=torch.ones_like(input_ids),
        )
        if temperature > 0:
            kwargs.update(
                temperature=temperature,
                top_p=float(args.get("top_p", 1.0)),
                top_k=int(args.get("top_k", 0)),
            )
        seed = args.get("seed")
        with self._lock, torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(input_ids, **kwargs)
        new = out.sequences[0, len(ids) :].tolist()
        logits = torch.stack(out.logits, dim=0)[: len(new), 0].float()  # [new, vocab]
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, torch.tensor(new, device=logits.device)[:, None])[:, 0]
        finish = "stop" if new and new[-1] in eos else "length"
        text_ids = new[:-1] if finish == "stop" else new
        text = decode_ids(self.tokenizer, text_ids) if self.tokenizer is not None else ""
        return Generation(
            prompt_token_ids=ids,
            token_ids=new,
            logprobs=chosen.tolist(),
            text=text,
            finish_reason=finish,
        )

    async def agenerate(self, prompt: str | Sequence[int], **generation_args: Any) -> Generation:
        return await asyncio.to_thread(self.generate, prompt, **generation_args)
