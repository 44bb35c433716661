"""The OpenAI-compatible server, over real HTTP on 127.0.0.1 (stdlib ``urllib`` as client).

The server runs in a thread with its own event loop, in front of an in-process engine over
the tiny Llama; answers are checked against the same model run directly by the engine.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from mcore.inference import DynamicInferenceEngine, SamplingParams, load_model
from mcore.inference.async_engine import AsyncInferenceEngine
from mcore.inference.server.app import OpenAIServer, run_http_server
from mcore.inference.tokenizer import encode_chat

KEY = "test-key"


@dataclass
class Server:
    url: str
    engine: DynamicInferenceEngine
    reference: DynamicInferenceEngine

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as error:
            text, status = error.read().decode(), error.code
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **kw)

    def events(self, path: str, body: dict[str, Any]) -> list[Any]:
        """The ``data:`` payloads of a streamed response, ``[DONE]`` last."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        req.add_header("Authorization", f"Bearer {KEY}")
        out = []
        with urllib.request.urlopen(req, timeout=120) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: "):
                    payload = line[len("data: ") :]
                    out.append(payload if payload == "[DONE]" else json.loads(payload))
        return out

    def greedy(self, prompt_ids: list[int], max_tokens: int, **kw: Any) -> Any:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)
        return self.reference.generate([prompt_ids], params)[0]


@pytest.fixture(scope="module")
def server(llama_dir, engine_config):
    model, tokenizer = load_model(llama_dir)
    engine = DynamicInferenceEngine(model, engine_config(), tokenizer=tokenizer)
    reference = DynamicInferenceEngine(
        load_model(llama_dir)[0], engine_config(), tokenizer=tokenizer
    )
    ready, state = threading.Event(), {}

    async def main() -> None:
        served = await AsyncInferenceEngine(engine).start()
        state["stop"], state["loop"] = asyncio.Event(), asyncio.get_running_loop()
        front = OpenAIServer(
            served, tokenizer, model_name="tiny", api_key=KEY, max_sequence_length=512,
            max_body_bytes=2**20,
        )  # fmt: skip

        def on_ready(url: str) -> None:
            state["url"] = url
            ready.set()

        try:
            await run_http_server(front, ready=on_ready, stop=state["stop"])
        finally:
            await served.shutdown()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(60), "the server did not start"
    yield Server(state["url"], engine, reference)
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(30)
    assert not thread.is_alive()


def test_binds_to_loopback_and_reports_health_and_models(server) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    status, health = server.request("GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["suspended"] is False
    status, body = server.request("GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny"


def test_completion_equals_the_engine(server) -> None:
    tok = server.engine.tokenizer
    status, body = server.post(
        "/v1/completions",
        {"model": "tiny", "prompt": "the quick brown", "max_tokens": 10, "temperature": 0,
         "ignore_eos": True, "logprobs": 2},
    )  # fmt: skip
    assert status == 200, body
    want = server.greedy(tok.encode("the quick brown"), 10, logprobs=2)
    (choice,) = body["choices"]
    assert choice["text"] == want.text and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    n = len(tok.encode("the quick brown"))
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 10, "total_tokens": n + 10}


def test_token_id_prompts_batches_and_n(server) -> None:
    status, body = server.post(
        "/v1/completions",
        {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 4, "n": 2, "temperature": 0.8,
         "seed": 3, "ignore_eos": True},
    )  # fmt: skip
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 16


def test_return_token_ids_gives_ids_beside_the_text(server) -> None:
    ids = server.engine.tokenizer.encode("the quick brown")
    body = {"prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    status, whole = server.post("/v1/completions", body)
    assert status == 200, whole
    (choice,) = whole["choices"]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == server.greedy(ids, 5).token_ids
    streamed = server.events("/v1/completions", {**body, "stream": True})
    assert streamed[-1] == "[DONE]"
    pieces = [t for e in streamed[:-1] if e["choices"] for t in e["choices"][0]["token_ids"]]
    assert pieces == choice["token_ids"]
    status, bad = server.post("/v1/completions", {**body, "return_token_ids": "yes"})
    assert status == 400 and bad["error"]["param"] == "return_token_ids"


def test_streamed_completion_equals_the_whole_one(server) -> None:
    body = {"prompt": "hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events = server.events("/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = chunks.pop()["usage"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    want = server.greedy(server.engine.tokenizer.encode("hello world"), 12)
    assert text == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == 12


def test_chat_applies_the_template_and_streams(server) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    prompt = encode_chat(server.engine.tokenizer, messages)
    assert prompt == server.engine.tokenizer.encode(
        "<|user|>hi there<|end|><|assistant|>", add_special_tokens=False
    )
    want = server.greedy(prompt, 8)
    status, body = server.post(
        "/v1/chat/completions",
        {"messages": messages, "max_completion_tokens": 8, "temperature": 0, "ignore_eos": True},
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["usage"]["prompt_tokens"] == len(prompt)

    events = server.events(
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
         "stream": True, "logprobs": True, "top_logprobs": 1},
    )  # fmt: skip
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    logprobs = [
        e
        for c in chunks
        if c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(logprobs) == 8 and all(len(e["top_logprobs"]) == 1 for e in logprobs)


def test_stop_strings_cut_the_text(server) -> None:
    ids = server.engine.tokenizer.encode("continuous batching")
    free = server.greedy(ids, 20).text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    status, body = server.post(
        "/v1/completions",
        {"prompt": ids, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": stop},
    )
    assert status == 200, body
    assert body["choices"][0]["text"] == free[: free.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "positive"),
        ({"prompt": "x", "max_tokens": -5}, "max_tokens", "positive"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ({"prompt": "x", "top_p": 2.0}, "top_p", "(0, 1]"),
        ({"prompt": "x", "echo": True}, "echo", "not supported"),
        ({"prompt": "x", "n": 0}, "n", "[1,"),
        ({"prompt": [], "max_tokens": 3}, "prompt", "non-empty"),
        ({"prompt": [5] * 600, "max_tokens": 3}, "prompt", "max_sequence_length"),
        ({"max_tokens": 3}, "prompt", "prompt"),
    ],
)
def test_bad_completion_requests_get_a_400_naming_the_field(server, body, param, words) -> None:
    status, answer = server.post("/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


def test_malformed_requests_get_json_errors_and_the_server_keeps_serving(server) -> None:
    status, answer = server.post("/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = server.post("/v1/completions", None, raw=b'["a list"]')
    assert status == 400 and "JSON object" in answer["error"]["message"]
    status, answer = server.post("/v1/chat/completions", {"messages": [{"content": "no role"}]})
    assert status == 400 and answer["error"]["param"] == "messages"
    status, answer = server.post("/v1/completions", {"model": "other", "prompt": "x"})
    assert status == 404 and "'other' does not exist" in answer["error"]["message"]
    status, answer = server.request("GET", "/v1/nothing-here")
    assert status == 404 and answer["error"]["code"] == 404
    status, answer = server.request("GET", "/v1/completions")
    assert status == 405 and "error" in answer
    status, answer = server.post("/v1/completions", None, raw=b"x" * (2**20 + 10))
    assert status == 413 and "error" in answer
    assert server.request("GET", "/health", key=None)[0] == 200
    status, body = server.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2


def test_the_api_key_guards_v1_routes(server) -> None:
    for key in (None, "wrong"):
        status, answer = server.post("/v1/completions", {"prompt": "x"}, key=key)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert server.request("GET", "/v1/models", key=None)[0] == 401
    assert server.request("GET", "/health", key=None)[0] == 200


def test_a_client_that_hangs_up_aborts_its_request(server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # generation has started
    connection.close()
    deadline = time.monotonic() + 60
    while server.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.engine.has_unfinished_requests()


def test_metrics_count_requests_and_tokens(server) -> None:
    server.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 3, "ignore_eos": True})
    status, text = server.request("GET", "/metrics", key=None)
    assert status == 200
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["mcore_generation_tokens_total"]) >= 3
    assert float(lines['mcore_requests_finished_total{finish_reason="length"}']) >= 1
    assert 'mcore_http_requests_total{path="/v1/completions",status="200"}' in lines
    assert "mcore_kv_cache_usage_ratio" in lines and "mcore_running" in lines
    assert float(lines["mcore_state_slots_in_use"]) == 0  # no recurrent layers in this model
    assert float(lines["mcore_time_to_first_token_seconds_count"]) >= 1


def test_health_reports_the_engines_real_state(llama_dir, engine_config) -> None:
    import aiohttp

    model, tokenizer = load_model(llama_dir)
    engine = DynamicInferenceEngine(model, engine_config(), tokenizer=tokenizer)

    async def main() -> None:
        served = await AsyncInferenceEngine(engine).start()
        stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
        front = OpenAIServer(served, tokenizer, model_name="tiny")
        http_task = asyncio.create_task(run_http_server(front, ready=ready.set_result, stop=stop))
        url = await asyncio.wait_for(ready, 60)

        async def health() -> tuple[int, dict]:
            async with aiohttp.ClientSession() as http, http.get(url + "/health") as response:
                return response.status, await response.json()

        assert await health() == (200, {"status": "ok", "paused": False, "suspended": False,
                                        "running": 0, "waiting": 0})  # fmt: skip
        await served.pause()
        await served.suspend()
        status, state = await health()
        assert status == 200 and state["paused"] and state["suspended"]
        await served.resume()
        await served.shutdown()  # the stepping thread is gone: not healthy
        assert await health() == (503, {"status": "stopped"})
        stop.set()
        await http_task

    asyncio.run(main())
