"""The data-parallel coordinator over real ZMQ sockets on 127.0.0.1.

First everything in one event loop (coordinator, two in-process engine ranks, a client): the
handshake, round-robin spreading, routing back, control acknowledgements, a malformed frame,
and a clean STOP. Then two engine ranks as real processes serve 200 concurrent requests, have
their KV caches suspended and resumed mid-generation, and one is killed: its requests fail
with an error naming it and the other keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio

from mcore.inference import (
    ContextOverflowError,
    DynamicInferenceEngine,
    InferenceClient,
    InferenceCoordinator,
    SamplingParams,
    load_model,
)
from mcore.inference.coordinator.engine_rank import EngineRank

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
RANK_CONFIG = dict(
    max_requests=64,
    max_tokens=256,
    block_size_tokens=16,
    kv_cache_blocks=512,
    device="cpu",
    max_sequence_length=1024,
)


def _reference(folder, prompts, params, engine_config):
    model, tokenizer = load_model(folder)
    engine = DynamicInferenceEngine(model, engine_config(**RANK_CONFIG), tokenizer=tokenizer)
    return [out.token_ids for out in engine.generate(prompts, params)]


def test_one_event_loop_routes_controls_and_stops_cleanly(
    llama_dir, engine_config, random_prompts
) -> None:
    tokenizer = load_model(llama_dir)[1]
    prompts = random_prompts([3 + i % 11 for i in range(20)], tokenizer.vocab_size)
    expected = _reference(llama_dir, prompts, GREEDY, engine_config)

    async def main() -> None:
        coordinator = InferenceCoordinator()  # port chosen automatically
        served = asyncio.create_task(coordinator.serve())
        await coordinator.wait_started()
        ranks = []
        for rank in range(2):
            engine = DynamicInferenceEngine(
                load_model(llama_dir)[0], engine_config(**RANK_CONFIG), tokenizer=tokenizer
            )
            ranks.append(
                asyncio.create_task(EngineRank(engine, coordinator.address, rank=rank).serve())
            )
        client = await InferenceClient(coordinator.address).start(wait_for_engines=2)

        outputs = await asyncio.gather(*(client.submit(p, GREEDY) for p in prompts))
        assert [o.token_ids for o in outputs] == expected
        assert {o.engine_rank for o in outputs} == {0, 1}  # spread over both ranks

        for signal_name in ("PAUSE", "UNPAUSE", "SUSPEND", "RESUME"):
            assert await client.control(signal_name) == 2
        # A request refused by its rank raises at submission, as with the engine itself: the
        # same error type, naming the request and by how much it overflows.
        with pytest.raises(ContextOverflowError, match="max_sequence_length") as refused:
            await client.submit([5] * 2000, GREEDY, request_id="too-long")
        assert refused.value.request_id == "too-long" and refused.value.field == "prompt"
        assert refused.value.tokens >= 2000 and 0 < refused.value.limit < 2000
        assert str(refused.value).count("too-long") == 1

        # A frame that is not msgpack (here: a pickle) is refused; the router keeps going.
        raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        raw.connect(coordinator.address)
        await raw.send(pickle.dumps({"type": "submit"}))
        reply = await asyncio.wait_for(raw.recv(), 10)
        assert b"not a msgpack message" in reply
        raw.close(linger=0)
        assert (await client.submit(prompts[0], GREEDY)).token_ids == expected[0]

        # The HTTP server runs over the coordinator as it does over an in-process engine.
        await _http_over(client, tokenizer, prompts[0], expected[0])

        assert await client.stop() == 2  # both ranks acknowledged, then exit
        await asyncio.wait_for(asyncio.gather(served, *ranks), timeout=30)
        assert coordinator.stopped_by_signal
        await client.close()

    asyncio.run(main())


def test_a_rank_that_shuts_down_says_goodbye_and_its_requests_fail(llama_dir, engine_config):
    model, tokenizer = load_model(llama_dir)
    engine = DynamicInferenceEngine(model, engine_config(**RANK_CONFIG), tokenizer=tokenizer)

    async def main() -> None:
        coordinator = InferenceCoordinator(port=_free_port())  # a port of our choosing
        served = asyncio.create_task(coordinator.serve())
        await coordinator.wait_started()
        stop = asyncio.Event()
        rank = asyncio.create_task(EngineRank(engine, coordinator.address).serve(stop=stop))
        client = await InferenceClient(coordinator.address).start(wait_for_engines=1)
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        stream = await client.add_request([5, 6, 7], long)
        first = await stream.__anext__()
        assert not first.finished
        stop.set()  # e.g. SIGTERM in an engine process
        final = await stream.final()
        assert final.finish_reason == "error" and "shut down" in final.error
        await asyncio.wait_for(rank, timeout=30)
        out = await client.submit([5, 6], GREEDY)  # nobody left to serve it
        assert out.finish_reason == "error" and "no engine rank" in out.error
        await client.close()
        await coordinator.aclose()
        await asyncio.wait_for(served, timeout=30)

    asyncio.run(main())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_over(client, tokenizer, prompt: list[int], expected: list[int]) -> None:
    import aiohttp

    from mcore.inference.server.app import OpenAIServer, run_http_server

    server = OpenAIServer(client, tokenizer, model_name="tiny")
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_http_server(server, ready=ready.set_result, stop=stop))
    url = await ready
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/completions", json=body) as response:
            answer = await response.json()
        assert response.status == 200, answer
        assert answer["choices"][0]["text"] == tokenizer.decode(expected)
        async with http.post(url + "/v1/completions", json={**body, "stream": True}) as response:
            events = [line async for line in response.content if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]\n"
        async with http.get(url + "/metrics") as response:
            assert "mcore_engines_alive 2" in await response.text()
    stop.set()
    await task


def _spawn_rank(folder, address: str, rank: int, log) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mcore.inference.coordinator.engine_rank",
        "--model", str(folder), "--coordinator", address, "--rank", str(rank),
        "--config-json", json.dumps(RANK_CONFIG), "--threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def test_two_rank_processes_serve_200_requests_and_survive_a_dead_rank(
    llama_dir, engine_config, random_prompts, tmp_path
) -> None:
    tokenizer_vocab = load_model(llama_dir)[1].vocab_size
    prompts = random_prompts([3 + (7 * i) % 23 for i in range(200)], tokenizer_vocab)
    long_prompts = random_prompts([12, 9, 15, 6, 10, 14], tokenizer_vocab, seed=5)
    long_params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)

    def references():
        return (
            _reference(llama_dir, prompts, GREEDY, engine_config),
            _reference(llama_dir, long_prompts, long_params, engine_config),
        )

    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]  # noqa: SIM115
    processes: list[subprocess.Popen] = []

    async def main() -> None:
        # Started from inside a running loop: the coordinator runs in its own thread.
        coordinator = InferenceCoordinator(heartbeat_timeout_s=3.0)
        address = coordinator.start()
        processes.extend(_spawn_rank(llama_dir, address, r, logs[r]) for r in range(2))
        # The in-process references are computed while the ranks start up.
        expected_all = asyncio.get_running_loop().run_in_executor(None, references)
        client = await InferenceClient(address).start(wait_for_engines=2, timeout_s=120)
        expected, long_expected = await expected_all

        # 200 concurrent requests, none lost, each with the right tokens.
        outputs = await asyncio.gather(*(client.submit(p, GREEDY) for p in prompts))
        assert [o.token_ids for o in outputs] == expected
        assert sorted({o.engine_rank for o in outputs}) == [0, 1]

        # Suspend both ranks' KV caches mid-generation; the tokens do not change.
        streams = [await client.add_request(p, long_params) for p in long_prompts]
        firsts = [await s.__anext__() for s in streams]
        assert await client.suspend() == 2
        assert await client.resume() == 2
        finals = [await s.final() for s in streams]
        assert [f.token_ids for f in finals] == long_expected

        # Kill rank 1 while both ranks have requests in flight.
        streams = [await client.add_request(p, long_params) for p in long_prompts]
        firsts = [await s.__anext__() for s in streams]
        on_rank = {r: [i for i, f in enumerate(firsts) if f.engine_rank == r] for r in (0, 1)}
        assert on_rank[0] and on_rank[1]
        assert all(not f.finished for f in firsts)
        processes[1].send_signal(signal.SIGKILL)
        finals = [await s.final() for s in streams]
        for i in on_rank[1]:
            assert finals[i].finish_reason == "error"
            assert "engine rank 1" in finals[i].error and "died" in finals[i].error
        for i in on_rank[0]:
            assert finals[i].token_ids == long_expected[i]
        status = await client.status()
        assert [e["alive"] for e in sorted(status["engines"], key=lambda e: e["rank"])] == [
            True,
            False,
        ]
        # /health's view: still serving, on one of the two ranks.
        assert await client.health() == {"status": "ok", "engines_alive": 1, "engines": 2}

        # The survivor takes every new request.
        again = await asyncio.gather(*(client.submit(p, GREEDY) for p in prompts[:10]))
        assert [o.token_ids for o in again] == expected[:10]
        assert {o.engine_rank for o in again} == {0}

        assert await client.stop() == 1  # only the live rank acknowledges
        await client.close()
        coordinator.stop()

    try:
        asyncio.run(main())
        assert processes[0].wait(timeout=30) == 0  # exited after STOP
    except BaseException:
        for log in logs:
            log.flush()
        print("\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2)))
        raise
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
