"""Model replicas split over tensor-parallel ranks, served together.

- ``ReplicaEngine`` on two gloo ranks: the leader takes requests (greedy, seeded sampling, an
  abort, a suspend) and the follower only follows; greedy tokens equal transformers'.
- ``mcore serve --inference.dp 2 --inference.tp 2``'s launcher: four engine processes, two
  replicas behind the coordinator; 200 concurrent requests come back right, and when one
  process of a replica is killed only that replica's requests fail, naming it.
- ``mcore serve --inference.tp 2`` and ``mcore generate --inference.tp 2`` end to end, and a
  tensor-parallel size that does not divide the model refused before anything starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mcore.core import McoreError
from mcore.core.testing import run_ranks, served
from mcore.inference import (
    DynamicInferenceEngine,
    InferenceClient,
    InferenceConfig,
    InferenceCoordinator,
    ReplicaEngine,
    SamplingParams,
    load_model,
)
from mcore.inference.cli import launch_replicas
from mcore.inference.errors import EngineStateError
from mcore.inference.loading import check_layout
from mcore.parallel import ParallelState

BIN = Path(sys.executable).parent
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
CPU = ["--inference.device", "cpu", "--inference.max-requests", "8"]


def _replica(rank, world, folder, prompts, config):
    model, tokenizer = load_model(folder, parallel_state=ParallelState(tp=world))
    engine = ReplicaEngine(model, config, tokenizer=tokenizer)
    if not engine.is_leader:
        try:
            engine.add_request([1, 2, 3])
        except EngineStateError as refused:
            message = str(refused)
        return engine.follow(), message
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    # One request aborted after a few steps, one run through a suspend (offloaded KV).
    doomed = engine.add_request(prompts[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort(doomed)
    ids = [engine.add_request(p, GREEDY) for p in prompts] + [
        engine.add_request(prompts[1], sampled)
    ]
    tokens = {rid: [] for rid in ids}
    finished = set()
    while len(finished) < len(ids):
        if engine._steps == 6:
            engine.suspend()
            engine.idle()
            engine.resume()
        for delta in engine.step():  # each request's new tokens
            tokens[delta.request_id].extend(delta.token_ids)
            if delta.finished:
                finished.add(delta.request_id)
    engine.close()
    return engine._steps, [tokens[i] for i in ids]


def test_replica_engine_leader_and_follower_step_in_lockstep(
    hf_dirs, hf_greedy, random_prompts, engine_config
) -> None:
    folder, hf = hf_dirs["llama"]
    prompts = random_prompts([5, 33, 12, 2], hf.config.vocab_size)
    config = dataclasses.replace(engine_config(max_tokens=24), suspend_mode="offload")
    (steps, tokens), (followed, refused) = run_ranks(
        _replica, 2, folder, prompts, config, backend="gloo"
    )
    assert followed == steps  # the follower took every step the leader took
    assert "requests go to the leader" in refused
    for prompt, got in zip(prompts, tokens, strict=False):
        assert got == hf_greedy(hf, prompt, 8)
    assert len(tokens[-1]) == 8  # the seeded sample ran on both ranks alike (else a hang)


def test_tensor_parallel_sizes_that_do_not_divide_the_model_are_refused(hf_dirs) -> None:
    folder, _ = hf_dirs["llama"]  # 4 heads, 2 key/value heads
    check_layout(folder, tp=2, pp=2)
    with pytest.raises(McoreError) as refused:
        check_layout(folder, tp=3)
    message = str(refused.value)
    assert "inference.tensor_model_parallel_size = 3" in message
    assert "model.num_attention_heads = 4" in message and "model.num_query_groups = 2" in message
    result = subprocess.run(
        [str(BIN / "mcore"), "serve", "--model", str(folder), "--inference.tp", "3", *CPU],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "num_attention_heads = 4" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(McoreError, match=r"pipeline_model_parallel_size = 3 is more stages"):
        check_layout(folder, pp=3)  # 2 layers
    with pytest.raises(McoreError, match=r"expert_model_parallel_size = 2, but the model has no"):
        check_layout(folder, ep=2)
    with pytest.raises(McoreError, match=r"does not divide the model's moe.num_experts = 4"):
        check_layout(hf_dirs["mixtral"][0], ep=3)
    with pytest.raises(McoreError, match=r"expert_model_parallel_size: 2 must divide data_par"):
        InferenceConfig(expert_model_parallel_size=2, data_parallel_size=3).checked()
    with pytest.raises(McoreError, match=r"tensor_model_parallel_size and pipeline_model_par"):
        InferenceConfig(
            expert_model_parallel_size=2, data_parallel_size=2, tensor_model_parallel_size=2
        ).checked()


def _reference(folder, prompts, params, config):
    model, tokenizer = load_model(folder)
    engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
    return [out.token_ids for out in engine.generate(prompts, params)]


def test_two_tensor_parallel_replicas_serve_200_requests_and_survive_a_dead_one(
    llama_dir, random_prompts, tmp_path
) -> None:
    config = InferenceConfig(
        max_requests=64,
        max_tokens=256,
        block_size_tokens=16,
        kv_cache_blocks=512,
        device="cpu",
        max_sequence_length=1024,
        data_parallel_size=2,
        tensor_model_parallel_size=2,
    )
    vocab = load_model(llama_dir)[1].vocab_size
    prompts = random_prompts([3 + (7 * i) % 23 for i in range(200)], vocab)
    long_prompts = random_prompts([12, 9, 15, 6, 10, 14], vocab, seed=5)
    long_params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    single = dataclasses.replace(config, data_parallel_size=1, tensor_model_parallel_size=1)
    log_file = open(tmp_path / "ranks.log", "w")  # noqa: SIM115
    processes: list[subprocess.Popen] = []

    def references():
        return (
            _reference(llama_dir, prompts, GREEDY, single),
            _reference(llama_dir, long_prompts, long_params, single),
        )

    async def main() -> None:
        coordinator = InferenceCoordinator(heartbeat_timeout_s=5.0)
        address = coordinator.start()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        processes.extend(
            launch_replicas(str(llama_dir), None, config, address, env=env, stdout=log_file)
        )
        expected_all = asyncio.get_running_loop().run_in_executor(None, references)
        client = await InferenceClient(address).start(wait_for_engines=2, timeout_s=180)
        expected, long_expected = await expected_all

        outputs = await asyncio.gather(*(client.submit(p, GREEDY) for p in prompts))
        assert [o.token_ids for o in outputs] == expected
        assert sorted({o.engine_rank for o in outputs}) == [0, 1]  # both replicas served

        # Kill the second process (a follower) of replica 1 while both have requests running.
        streams = [await client.add_request(p, long_params) for p in long_prompts]
        firsts = [await s.__anext__() for s in streams]
        on = {r: [i for i, f in enumerate(firsts) if f.engine_rank == r] for r in (0, 1)}
        assert on[0] and on[1]
        processes[3].send_signal(signal.SIGKILL)
        finals = [await s.final() for s in streams]
        for i in on[1]:
            assert finals[i].finish_reason == "error"
            assert "engine rank 1" in finals[i].error and "died" in finals[i].error
            assert "model replica" in finals[i].error  # says why: a rank of it is gone
        for i in on[0]:
            assert finals[i].token_ids == long_expected[i]
        assert await client.health() == {"status": "ok", "engines_alive": 1, "engines": 2}
        again = await asyncio.gather(*(client.submit(p, GREEDY) for p in prompts[:10]))
        assert [o.token_ids for o in again] == expected[:10]
        assert {o.engine_rank for o in again} == {0}

        assert await client.stop() == 1
        await client.close()
        coordinator.stop()

    try:
        asyncio.run(main())
        assert processes[2].wait(timeout=30) == 1  # replica 1's leader left, lost
        assert [p.wait(timeout=30) for p in processes[:2]] == [0, 0]  # replica 0 stopped
    except BaseException:
        log_file.flush()
        print((tmp_path / "ranks.log").read_text())
        raise
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        log_file.close()


# Each model and each layout served at least once (every pair runs in the Python API tests);
# `mcore generate` splits prompts over the two replicas of an expert-parallel pair. Routing over
# replicas by `mcore serve` is the dp2 x tp2 test above. Every launch of ranks costs seconds of
# imports per rank on the 2-core CI box, so each layout launches once.
EP2 = ["--inference.ep", "2", "--inference.dp", "2"]  # EP ranks are data-parallel replicas


@pytest.mark.parametrize(
    "case, layout, generate_layout",
    [("llama", ["--inference.tp", "2"], None), ("mixtral", ["--inference.pp", "2"], None),
     ("deepseek_v3", ["--inference.tp", "2", "--inference.pp", "2"], None),
     ("mixtral", EP2, EP2)],
)  # fmt: skip
def test_mcore_serve_and_generate_over_model_parallel_ranks_equal_transformers(
    case, layout, generate_layout, hf_dirs, hf_greedy, random_prompts
) -> None:
    folder, hf = hf_dirs[case]
    prompts = random_prompts([7, 19, 3], hf.config.vocab_size, seed=4)
    expected = [hf_greedy(hf, p, 6) for p in prompts]
    with served([str(BIN / "mcore"), "serve", "--model", str(folder), *layout, *CPU]) as url:
        for prompt, want in zip(prompts, expected, strict=True):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            body["return_token_ids"] = True
            request = urllib.request.Request(
                url + "/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                choice = json.load(response)["choices"][0]
            assert choice["token_ids"] == want
    if generate_layout is None:
        return
    # mcore generate over 2 replicas: the local ranks split the prompts.
    ids = [",".join(map(str, p)) for p in prompts]
    result = subprocess.run(
        [str(BIN / "mcore"), "generate", "--model", str(folder), *generate_layout,
         "--max-tokens", "6", "--ignore-eos", "--json", *CPU,
         *[a for i in ids for a in ("--prompt-ids", i)]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [x["token_ids"] for x in lines] == expected
