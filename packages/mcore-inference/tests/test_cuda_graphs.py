"""CUDA graphs: steps padded to captured shapes compute what unpadded steps compute.

The padding is checked on the CPU (each step padded to the nearest captured shape and run
eagerly: exactly what the graph replays); capture and replay themselves need a GPU and run in
the ``gpu``-marked tests.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from mcore.inference import DynamicInferenceEngine, SamplingParams, load_model
from mcore.inference.context import BatchDims
from mcore.inference.cuda_graphs import graph_shapes
from mcore.inference.request import OutputCollector

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


def test_shapes_cover_decode_counts_and_one_prefill_chunk() -> None:
    shapes = graph_shapes(max_requests=6, max_tokens=128, decode_sizes=None, prefill_tokens=None)
    decode_only = [s.num_decode for s in shapes if s.num_prefill == 0]
    assert decode_only == [1, 2, 4, 6]
    assert BatchDims(64 + 4, 1, 4) in shapes and BatchDims(64, 1, 0) in shapes
    assert all(s.num_tokens <= 128 for s in shapes)
    assert BatchDims(5, 1, 2).fits(BatchDims(4, 1, 1)) is True
    assert BatchDims(5, 1, 2).fits(BatchDims(5, 1, 1)) is False  # 4 prefill tokens > 3


def test_steps_padded_to_captured_shapes_give_the_same_tokens(
    hf_dirs, engine_config, random_prompts
) -> None:
    folder = hf_dirs["llama"][0]
    model, tokenizer = load_model(folder)
    prompts = random_prompts([4, 30, 11, 50, 7], tokenizer.vocab_size)
    eager = DynamicInferenceEngine(model, engine_config(), tokenizer=tokenizer)
    expected = eager.generate(prompts, PARAMS)

    padded = DynamicInferenceEngine(load_model(folder)[0], engine_config(), tokenizer=tokenizer)
    shapes = graph_shapes(8, 64, None, [16, 32])
    runner, used = padded.runner, []

    def execute_padded(chunks):
        decode = sum(1 for c in chunks if c.num_tokens == 1)
        actual = BatchDims(sum(c.num_tokens for c in chunks), len(chunks) - decode, decode)
        fitting = [s for s in shapes if s.fits(actual)]
        if not fitting:
            return type(runner).execute(runner, chunks)
        dims = min(fitting)
        used.append(dims)
        batch = runner.context.build_batch(chunks, dims)
        assert batch.paged.input_ids.shape == (dims.num_tokens,)
        with torch.inference_mode():
            logits = runner.model.forward_paged(batch.paged)
        assert logits.shape[0] == dims.num_decode + dims.num_prefill
        return logits.index_select(0, batch.sample_rows), batch.sample_chunks

    runner.execute = execute_padded
    # Requests arrive one by one, so steps mix one prefill chunk with running decodes.
    collectors, ids = defaultdict(OutputCollector), []

    def step() -> None:
        for delta in padded.step():
            collectors[delta.request_id].add(delta)

    for prompt in prompts:
        ids.append(padded.add_request(prompt, PARAMS))
        for _ in range(2):
            step()
    while padded.has_unfinished_requests():
        step()
    outputs = [collectors[i].output() for i in ids]
    assert any(d.num_prefill for d in used) and any(not d.num_prefill for d in used)
    for want, got in zip(expected, outputs, strict=True):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_cuda_graphs_replay_and_match_eager(hf_dirs, engine_config, random_prompts) -> None:
    folder = hf_dirs["llama"][0]
    config = dict(device="cuda", dtype="float32", cuda_graph_prefill_tokens=[32, 64])
    model, tokenizer = load_model(folder)
    prompts = random_prompts([4, 30, 11, 50, 7], tokenizer.vocab_size)
    eager = DynamicInferenceEngine(model, engine_config(**config), tokenizer=tokenizer)
    expected = eager.generate(prompts, PARAMS)

    model, _ = load_model(folder)
    graphed = DynamicInferenceEngine(
        model, engine_config(**config, enable_cuda_graph=True), tokenizer=tokenizer
    )
    assert graphed.runner.graphs.captured, graphed.runner.graphs.disabled_reason
    outputs = graphed.generate(prompts, PARAMS)
    assert graphed.runner.graph_steps > 0
    for want, got in zip(expected, outputs, strict=True):
        assert got.token_ids == want.token_ids

    # Suspend frees the cache and drops the graphs; resume recaptures them.
    graphed.suspend("offload")
    assert not graphed.runner.graphs.captured
    graphed.resume()
    assert graphed.runner.graphs.captured
    again = graphed.generate(prompts, PARAMS)
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]


@pytest.mark.gpu
def test_moe_models_fall_back_to_eager_with_cuda_graphs(hf_dirs, engine_config) -> None:
    model, tokenizer = load_model(hf_dirs["mixtral"][0])
    engine = DynamicInferenceEngine(
        model, engine_config(device="cuda", enable_cuda_graph=True), tokenizer=tokenizer
    )
    out = engine.generate([[5, 6, 7]], PARAMS)[0]
    assert len(out.token_ids) == PARAMS.max_tokens
    graphs = engine.runner.graphs
    assert graphs.captured or graphs.disabled_reason  # captured, or refused with a reason
