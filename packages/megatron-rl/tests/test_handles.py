"""Inference handles against real servers of the model: our engine in process, engine ranks
behind the ZMQ coordinator, ``mcore serve`` over HTTP on 127.0.0.1, and a ``transformers``
model. Each returns the tokens the model generates and their log-probabilities, which a
teacher-forced forward of the same model recomputes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mcore.core import McoreError
from megatron_rl.agents import MultiTurnAgent, SingleTurnAgent
from megatron_rl.envs import ArithmeticEnv
from megatron_rl.handles import CoordinatorHandle, EngineHandle, HFHandle, OpenAIHandle

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 14, 3], [7, 7, 2], [11, 4, 30, 8, 21]]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, write_hf_llama) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("rl-handles") / "llama"
    return folder, write_hf_llama(folder)


@pytest.fixture(scope="module")
def engine(hf_model):
    from mcore.inference import DynamicInferenceEngine, InferenceConfig, load_model

    model, tokenizer = load_model(hf_model[0])
    config = InferenceConfig(
        max_requests=8, max_tokens=64, block_size_tokens=8, kv_cache_blocks=64, device="cpu",
        max_sequence_length=128,
    )  # fmt: skip
    return DynamicInferenceEngine(model, config, tokenizer=tokenizer)


def _teacher_forced(hf, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion token) under ``hf``, from one forward of prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    rows = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return [logprobs[r, t].item() for r, t in zip(rows, completion, strict=True)]


GREEDY = dict(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_engine_handle_generates_what_the_model_scores(engine, hf_model) -> None:
    handle = EngineHandle(engine)
    hf = hf_model[1]
    out = handle.generate(PROMPTS[0], **GREEDY)
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert out.logprobs == pytest.approx(_teacher_forced(hf, PROMPTS[0], out.token_ids), abs=1e-4)
    # Sampled, seeded requests run concurrently give what each gives alone.
    sampled = dict(max_tokens=5, temperature=1.0, ignore_eos=True)
    alone = [handle.generate(p, seed=i, **sampled) for i, p in enumerate(PROMPTS)]

    async def together():
        return await asyncio.gather(
            *(handle.agenerate(p, seed=i, **sampled) for i, p in enumerate(PROMPTS))
        )

    batched = asyncio.run(together())
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    for prompt, o in zip(PROMPTS, batched, strict=True):
        assert o.logprobs == pytest.approx(_teacher_forced(hf, prompt, o.token_ids), abs=1e-4)
    assert handle.generated_tokens == 15 and handle.num_in_flight == 0
    with pytest.raises(McoreError, match="unknown generation argument"):
        handle.generate(PROMPTS[0], max_new_tokens=3)


def test_hf_handle_matches_the_engine_on_the_same_weights(engine, hf_model) -> None:
    folder, hf = hf_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    handle = HFHandle(hf, tokenizer)
    ours = EngineHandle(engine)
    for prompt in PROMPTS:
        out = handle.generate(prompt, **GREEDY)
        assert out.token_ids == ours.generate(prompt, **GREEDY).token_ids
        assert out.logprobs == pytest.approx(_teacher_forced(hf, prompt, out.token_ids), abs=1e-5)
    sampled = handle.generate("the quick", max_tokens=4, temperature=1.0, seed=3)
    assert sampled.prompt_token_ids == tokenizer.encode("the quick", add_special_tokens=False)
    again = asyncio.run(handle.agenerate("the quick", max_tokens=4, temperature=1.0, seed=3))
    assert again.token_ids == sampled.token_ids  # seeded: reproducible


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(hf_model):
    """``mcore serve`` on 127.0.0.1 in its own process."""
    port = _free_port()
    command = [
        sys.executable, "-m", "mcore.core.cli", "serve", "--model", str(hf_model[0]),
        "--port", str(port), "--inference.device", "cpu", "--inference.max-requests", "8",
        "--inference.block-size-tokens", "8", "--inference.kv-cache-blocks", "64",
        "--inference.max-sequence-length", "128",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mcore serve did not start:\n{proc.stdout.read()}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_handle_against_mcore_serve(served, engine, hf_model) -> None:
    from mcore.inference.tokenizer import HFTextTokenizer

    folder, hf = hf_model
    handle = OpenAIHandle(served, tokenizer=HFTextTokenizer(folder))
    ours = EngineHandle(engine)
    for prompt in PROMPTS:
        out = handle.generate(prompt, **GREEDY)
        expected = ours.generate(prompt, **GREEDY)
        assert out.token_ids == expected.token_ids
        assert out.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
        assert out.text == expected.text

    async def concurrent():
        return await asyncio.gather(
            *(handle.agenerate(p, max_tokens=4, temperature=1.0, seed=9) for p in PROMPTS)
        )

    for prompt, out in zip(PROMPTS, asyncio.run(concurrent()), strict=True):
        assert len(out.token_ids) == len(out.logprobs) >= 1
        assert out.logprobs == pytest.approx(_teacher_forced(hf, prompt, out.token_ids), abs=1e-4)
    with pytest.raises(McoreError, match="answered 400"):
        handle.generate(PROMPTS[0], max_tokens=4, top_p=2.0)
    with pytest.raises(McoreError, match="returned token strings"):
        OpenAIHandle(served).generate(PROMPTS[0], max_tokens=2)
    handle.close()


def test_coordinator_handle_over_engine_ranks(engine, hf_model) -> None:
    from mcore.inference import DynamicInferenceEngine, InferenceCoordinator, load_model
    from mcore.inference.coordinator.engine_rank import EngineRank

    model, tokenizer = load_model(hf_model[0])
    served_engine = DynamicInferenceEngine(model, engine.config, tokenizer=tokenizer)
    coordinator = InferenceCoordinator()
    address = coordinator.start()
    stop = threading.Event()

    def serve_rank() -> None:
        async def main() -> None:
            stopped = asyncio.Event()
            rank = asyncio.create_task(EngineRank(served_engine, address).serve(stop=stopped))
            while not stop.is_set():
                await asyncio.sleep(0.05)
            stopped.set()
            await rank

        asyncio.run(main())

    thread = threading.Thread(target=serve_rank, daemon=True)
    thread.start()
    handle = CoordinatorHandle(address, tokenizer=tokenizer)
    try:
        ours = EngineHandle(engine)
        for prompt in PROMPTS:
            out = handle.generate(prompt, **GREEDY)
            expected = ours.generate(prompt, **GREEDY)
            assert out.token_ids == expected.token_ids
            assert out.logprobs == pytest.approx(expected.logprobs, abs=1e-6)
        assert handle.suspend() == 1 and handle.resume() == 1
        # Agents drive any handle: a multi-turn episode through the coordinator.
        env = ArithmeticEnv(max_operand=5)
        episode = asyncio.run(
            MultiTurnAgent(max_turns=2).run(env.problem(0), env, handle, **GREEDY)
        )
        assert episode.num_turns == 2 and episode.reward == 0.0  # a random model is wrong
        assert len(episode.token_ids) == len(episode.generated) == len(episode.logprobs)
        assert episode.num_generated == 12  # two turns of 6; the observation is not trained on
        single = asyncio.run(SingleTurnAgent().run(env.problem(0), env, handle, **GREEDY))
        assert single.token_ids == episode.token_ids[: len(single.token_ids)]
    finally:
        handle.close()
        stop.set()
        thread.join(timeout=30)
        coordinator.stop()
