"""The output path reports deltas: per-step work that does not grow with a request's length.

The counting test runs a short and a long request and counts, step by step, what the output
path handles: the token ids, logprobs and top-logprob entries in the step's deltas, the
characters of their text, and the token ids the detokenizer decodes. Every count stays under a
constant however long the request runs. The other tests check that the deltas add up to exactly
the whole output (tokens, logprobs, text cut at a stop string) through the Python API, the
``AsyncInferenceEngine``, the coordinator and the HTTP server, and that the server tokenises
off its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import defaultdict
from dataclasses import dataclass

from mcore.inference import InferenceClient, InferenceCoordinator, SamplingParams
from mcore.inference.async_engine import AsyncInferenceEngine
from mcore.inference.coordinator.engine_rank import EngineRank
from mcore.inference.request import OutputCollector, RequestDelta
from mcore.inference.server.app import OpenAIServer, run_http_server
from mcore.inference.tokenizer import IncrementalDetokenizer

WINDOW = IncrementalDetokenizer.CONTEXT + 2 * IncrementalDetokenizer.MAX_PENDING
"""Token ids the detokenizer decodes together at most."""


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


@dataclass
class StepWork:
    items: int
    """Token ids, logprobs and top-logprob entries in the step's deltas."""
    chars: int
    """Characters of text in them."""
    decoded: int
    """Token ids the tokenizer decoded during the step."""


def _count_decoded(tokenizer, monkeypatch) -> list[int]:
    """Counts every token id ``tokenizer.decode`` is given, from now on."""
    counter = [0]
    decode = tokenizer.decode

    def counting(ids, **kw):
        counter[0] += len(ids)
        return decode(ids, **kw)

    monkeypatch.setattr(tokenizer, "decode", counting)
    return counter


def _items(delta: RequestDelta) -> int:
    tops = sum(len(top) for top in delta.top_logprobs or ())
    return len(delta.token_ids) + len(delta.logprobs or ()) + tops


NO_STOP = "no such stop string"
"""Never generated, but the detokenizer holds back its length (less one) of text."""


def _work_per_step(engine, max_tokens: int, monkeypatch) -> list[StepWork]:
    decoded = _count_decoded(engine.tokenizer, monkeypatch)
    prompt = engine.tokenizer.encode("paged attention keeps")
    engine.add_request(prompt, _greedy(max_tokens, logprobs=2, stop=[NO_STOP]))
    steps = []
    while engine.has_unfinished_requests():
        before = decoded[0]
        deltas = engine.step()
        steps.append(
            StepWork(
                items=sum(_items(d) for d in deltas),
                chars=sum(len(d.text or "") for d in deltas),
                decoded=decoded[0] - before,
            )
        )
    return steps


def test_per_step_output_work_does_not_grow_with_length(llama_engine_factory, monkeypatch):
    engine = llama_engine_factory()
    vocab = engine.tokenizer.vocab_size
    longest_token = max(len(engine.tokenizer.decode([i], skip_special_tokens=False))
                        for i in range(vocab))  # fmt: skip
    short = _work_per_step(engine, 16, monkeypatch)
    long = _work_per_step(engine, 400, monkeypatch)
    assert len(long) >= 400 > 20 * len(short)

    # One token per step: its id, its logprob and (at most) three alternatives.
    assert max(w.items for w in short + long) <= 1 + 1 + 3
    # Its text; the last step also releases what was held back for the stop string.
    assert max(w.chars for w in long) <= longest_token + len(NO_STOP)
    # A bounded window of recent tokens decoded, twice.
    assert max(w.decoded for w in short + long) <= 2 * WINDOW
    # The last hundred steps of the long request cost what the short request's steps do.
    late = long[-100:]
    assert sum(w.items for w in late) / len(late) <= max(w.items for w in short)
    assert sum(w.decoded for w in late) / len(late) <= sum(w.decoded for w in short) / len(short)


def test_the_detokenizer_gives_a_full_decode_in_pieces(llama_engine_factory) -> None:
    tokenizer = llama_engine_factory().tokenizer
    text = "naïve café, the quick ☃ brown 日本語 fox 🙂 jumps over"
    ids = tokenizer.encode(text, add_special_tokens=False)  # multi-byte characters split
    ids = [t for i in ids for t in (i, 1) if t != 1 or i % 3 == 0]  # skipped <|pad|> tokens
    prompt = tokenizer.encode("hello world")
    for stop in ([], ["☃ b"], ["日本", "fox"], ["🙂"]):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, stop=stop)
        pieces = []
        for token in ids:
            stopped = detokenizer.add(token)
            pieces.append(detokenizer.take())
            if stopped:
                break
        pieces.append(detokenizer.take(final=True))
        whole = tokenizer.decode(ids)
        cut, first = min(((whole.index(s), s) for s in stop), default=(len(whole), None))
        assert "".join(pieces) == whole[:cut]
        assert detokenizer.stopped_by == first


def _stop_string(engine, prompt: list[int], max_tokens: int) -> str:
    """Three characters from the middle of the request's free-running text."""
    (free,) = engine.generate([prompt], _greedy(max_tokens))
    middle = len(free.text) // 2
    return free.text[middle : middle + 3]


def _joined(deltas: list[RequestDelta], field: str) -> list | None:
    pieces = [getattr(d, field) for d in deltas]
    return None if pieces[0] is None else [x for piece in pieces for x in piece]


def _assert_joined(deltas: list[RequestDelta], whole) -> None:
    """The deltas, joined, are exactly ``whole`` (a complete ``RequestOutput``)."""
    for field in ("token_ids", "logprobs", "top_logprobs"):
        assert _joined(deltas, field) == getattr(whole, field), field
    assert "".join(d.text for d in deltas) == whole.text
    assert [d.num_generated for d in deltas] == [
        sum(len(e.token_ids) for e in deltas[: i + 1]) for i in range(len(deltas))
    ]
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert deltas[-1].finish_reason == whole.finish_reason


def test_step_deltas_add_up_to_what_generate_returns(llama_engine_factory, random_prompts):
    engine = llama_engine_factory()
    prompts = random_prompts([9, 23, 4], engine.tokenizer.vocab_size, seed=5)
    stop = _stop_string(engine, prompts[0], 24)
    params = [_greedy(24, logprobs=2, stop=[stop]), _greedy(17, logprobs=1), _greedy(5, logprobs=0)]
    expected = llama_engine_factory().generate(prompts, params)
    assert expected[0].finish_reason == "stop" and expected[0].stop_reason == stop

    ids = [engine.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
    deltas, collectors = defaultdict(list), defaultdict(OutputCollector)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            deltas[delta.request_id].append(delta)
            collectors[delta.request_id].add(delta)
    for rid, prompt, want in zip(ids, prompts, expected, strict=True):
        _assert_joined(deltas[rid], want)
        got = collectors[rid].output()
        assert got.prompt_token_ids == prompt and got.metrics is not None
        assert (got.token_ids, got.logprobs, got.text) == (want.token_ids, want.logprobs, want.text)
        assert want.text == engine.tokenizer.decode(want.token_ids).split(stop)[0]


def test_async_streams_yield_deltas_that_add_up_to_the_final_output(
    llama_engine_factory, random_prompts
) -> None:
    engine = llama_engine_factory()
    (prompt,) = random_prompts([11], engine.tokenizer.vocab_size, seed=6)
    stop = _stop_string(engine, prompt, 30)
    params = _greedy(30, logprobs=1, stop=[stop])
    (want,) = llama_engine_factory().generate([prompt], params)

    async def main() -> None:
        async with AsyncInferenceEngine(engine) as served:
            deltas = [delta async for delta in served.generate(prompt, params)]
            _assert_joined(deltas, want)
            assert all(len(d.token_ids) == 1 for d in deltas)
            stream = await served.add_request(prompt, params)
            final = await stream.final()
            assert (final.token_ids, final.text, final.prompt_token_ids) == (
                want.token_ids, want.text, prompt
            )  # fmt: skip

    asyncio.run(main())


def test_coordinator_streams_the_engines_deltas(llama_engine_factory, random_prompts) -> None:
    engine = llama_engine_factory()
    (prompt,) = random_prompts([7], engine.tokenizer.vocab_size, seed=7)
    stop = _stop_string(engine, prompt, 30)
    params = _greedy(30, logprobs=2, stop=[stop])
    (want,) = llama_engine_factory().generate([prompt], params)

    async def main() -> None:
        coordinator = InferenceCoordinator()
        served = asyncio.create_task(coordinator.serve())
        await coordinator.wait_started()
        rank = asyncio.create_task(EngineRank(engine, coordinator.address).serve())
        client = await InferenceClient(coordinator.address).start(wait_for_engines=1)
        deltas = [delta async for delta in client.generate(prompt, params)]
        _assert_joined(deltas, want)
        final = await client.submit(prompt, params)
        assert (final.token_ids, final.logprobs, final.text) == (
            want.token_ids, want.logprobs, want.text
        )  # fmt: skip
        assert final.engine_rank == 0 and final.metrics is not None
        await client.stop()
        await asyncio.wait_for(asyncio.gather(served, rank), timeout=30)
        await client.close()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _http(engine):
    """The OpenAI server over ``engine`` on 127.0.0.1: yields its URL and the server."""
    import aiohttp

    async with AsyncInferenceEngine(engine) as served:
        front = OpenAIServer(served, engine.tokenizer, model_name="tiny")
        stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_http_server(front, ready=ready.set_result, stop=stop))
        url = await asyncio.wait_for(ready, 60)
        try:
            async with aiohttp.ClientSession(base_url=url) as http:
                yield http, front
        finally:
            stop.set()
            await task


async def _events(http, path: str, body: dict) -> list[dict]:
    async with http.post(path, json={**body, "stream": True}) as response:
        assert response.status == 200
        lines = [line async for line in response.content if line.startswith(b"data: ")]
    assert lines[-1].strip() == b"data: [DONE]"
    return [json.loads(line[len(b"data: ") :]) for line in lines[:-1]]


def test_streamed_http_chunks_add_up_to_the_whole_answer(llama_engine_factory) -> None:
    engine = llama_engine_factory()
    prompt = engine.tokenizer.encode("continuous batching mixes")
    stop = _stop_string(engine, prompt, 40)
    (want,) = llama_engine_factory().generate([prompt], _greedy(40, logprobs=1, stop=[stop]))
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stop": stop, "logprobs": 1, "return_token_ids": True}  # fmt: skip

    async def main() -> None:
        async with _http(engine) as (http, _):
            async with http.post("/v1/completions", json=body) as response:
                whole = (await response.json())["choices"][0]
            chunks = [e["choices"][0] for e in await _events(http, "/v1/completions", body)]
            assert "".join(c["text"] for c in chunks) == whole["text"] == want.text
            assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
            assert whole["token_ids"] == want.token_ids
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                streamed = [x for c in chunks for x in c["logprobs"][key]]
                assert streamed == whole["logprobs"][key], key
            assert chunks[-1]["finish_reason"] == whole["finish_reason"] == "stop"

            messages = [{"role": "user", "content": "the quick brown fox"}]
            chat = {"messages": messages, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True, "logprobs": True}  # fmt: skip
            async with http.post("/v1/chat/completions", json=chat) as response:
                whole = (await response.json())["choices"][0]
            chunks = [e["choices"][0] for e in await _events(http, "/v1/chat/completions", chat)]
            text = "".join(c["delta"].get("content", "") for c in chunks)
            assert text == whole["message"]["content"]
            tokens = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
            assert tokens == whole["logprobs"]["content"]

    asyncio.run(main())


def test_the_server_encodes_and_decodes_off_its_event_loop(llama_engine_factory) -> None:
    engine = llama_engine_factory()
    tokenizer = engine.tokenizer
    threads: dict[str, set[int]] = defaultdict(set)

    def watch(name: str) -> None:
        method = getattr(tokenizer, name)

        def watched(*args, **kw):
            threads[name].add(threading.get_ident())
            return method(*args, **kw)

        setattr(tokenizer, name, watched)

    for name in ("encode", "apply_chat_template", "token_text"):
        watch(name)

    async def main() -> None:
        loop_thread = threading.get_ident()
        async with _http(engine) as (http, _):
            completion = {"prompt": "the quick brown fox " * 20, "max_tokens": 4, "logprobs": 1}
            async with http.post("/v1/completions", json=completion) as response:
                assert response.status == 200, await response.text()
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                    "logprobs": True}  # fmt: skip
            await _events(http, "/v1/chat/completions", chat)
        assert set(threads) == {"encode", "apply_chat_template", "token_text"}
        assert loop_thread not in set().union(*threads.values())

    asyncio.run(main())
