"""What a decode step costs: host work that does not grow with the length of the requests,
and no more gathered padding than the lengths in the batch call for.

A step's block tables, positions and cache slots come from the KV manager's persistent block
table: a decode request costs the host a few scalars (its table row, position and last token),
however many blocks it holds, and its block-table row is selected on the device. The measure
is the host memory that building the batch allocates (Python objects and numpy arrays, which
``tracemalloc`` traces; tensors on the device are not host work), for the same decode step
while the requests are short and once they hold a hundred blocks each.

A batch of many decodes of mixed lengths attends in runs of similar length, each over its own
block-table width, and still generates what transformers does.
"""

from __future__ import annotations

import tracemalloc

from mcore.inference import SamplingParams

BLOCK = 4
NEW_TOKENS = 440


def _build_batch_bytes(engine, prompts) -> dict[int, int]:
    """Peak host bytes allocated while building each decode step, by the requests' length."""
    context = engine.context
    build = context.build_batch
    cost: dict[int, int] = {}

    def traced(chunks, dims=None):
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        batch = build(chunks, dims)
        peak = tracemalloc.get_traced_memory()[1] - before
        if all(c.num_tokens == 1 for c in chunks):
            cost[chunks[0].start] = peak
        return batch

    context.build_batch = traced
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    tracemalloc.start()
    try:
        engine.generate(prompts, params)
    finally:
        tracemalloc.stop()
    return cost


def test_a_decode_step_costs_the_host_the_same_at_any_length(
    llama_engine_factory, random_prompts
) -> None:
    engine = llama_engine_factory(
        block_size_tokens=BLOCK, kv_cache_blocks=4 * (8 + NEW_TOKENS) // BLOCK + 8
    )
    cost = _build_batch_bytes(engine, random_prompts([8] * 4, engine.tokenizer.vocab_size))
    # The same steps once short (2-5 blocks each) and once long (about 110 blocks each).
    short = min(cost[p] for p in range(10, 20))
    long = min(cost[p] for p in range(430, 440))
    # Rebuilding each request's block-table row would add 8 bytes per block per request.
    assert long - short < 4 * 8 * 8, f"{short} bytes at 10-20 tokens, {long} at 430-440"


def test_decodes_of_mixed_lengths_attend_in_runs_and_match_transformers(
    llama_engine_factory, hf_dirs, hf_greedy, random_prompts
) -> None:
    engine = llama_engine_factory(max_requests=24, max_tokens=512)
    hf = hf_dirs["llama"][1]
    prompts = random_prompts([3 + 3 * i for i in range(20)], hf.config.vocab_size)
    build, runs = engine.context.build_batch, []

    def spy(chunks, dims=None):
        batch = build(chunks, dims)
        runs.append([(rows.tolist(), blocks) for rows, blocks in batch.paged.decode_runs])
        return batch

    engine.context.build_batch = spy
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = engine.generate(prompts, greedy)
    split = [r for r in runs if r]
    assert split
    for step in split:  # the runs share out the decode rows, the longest first
        rows = sorted(row for run_rows, _ in step for row in run_rows)
        assert rows == [*range(len(rows))] and step[0][1] > step[-1][1]
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 6)
