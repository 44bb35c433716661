"""Greedy generations equal ``transformers`` ``generate`` token for token.

One batch per model mixes prompt lengths (some longer than a step's token budget, so they are
prefilled in chunks over several steps) and sampling settings (greedy rows next to sampled
rows with top-k, top-p, min-p and seeds). Greedy rows must equal transformers' greedy decoding
of the same prompt alone; sampled rows must equal themselves run alone (a seeded request does
not depend on what else is batched).
"""

from __future__ import annotations

import pytest

from mcore.inference import DynamicInferenceEngine, SamplingParams, load_model

NEW_TOKENS = 12
LENGTHS = (3, 70, 17, 1, 41, 9, 120, 26)


def _params(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    filters = [dict(top_k=20), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=50, top_p=0.9)]
    return SamplingParams(
        max_tokens=NEW_TOKENS,
        temperature=0.9,
        seed=100 + i,
        ignore_eos=True,
        logprobs=2,
        **filters[(i // 2) % 4],
    )


@pytest.mark.parametrize("case", ["llama", "mixtral", "deepseek_v3"])
def test_greedy_matches_transformers_in_a_mixed_batch(
    case, hf_dirs, hf_greedy, random_prompts, engine_config
) -> None:
    folder, hf = hf_dirs[case]
    model, tokenizer = load_model(folder)
    prompts = random_prompts(LENGTHS, tokenizer.vocab_size)
    params = [_params(i) for i in range(len(prompts))]
    # A 48-token step budget: the 70- and 120-token prompts are prefilled in chunks.
    engine = DynamicInferenceEngine(model, engine_config(max_tokens=48), tokenizer=tokenizer)
    outputs = engine.generate(prompts, params)
    assert engine.stats().steps > NEW_TOKENS + 2  # chunking took extra steps

    for prompt, p, out in zip(prompts, params, outputs, strict=True):
        assert out.finished and out.finish_reason == "length"
        assert len(out.token_ids) == NEW_TOKENS
        if p.greedy:
            assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)}"
        else:
            assert len(out.logprobs) == NEW_TOKENS and all(lp <= 0 for lp in out.logprobs)
            assert all(len(top) == 2 for top in out.top_logprobs)

    # A sampled request alone, in a fresh engine, draws the same tokens as inside the batch.
    alone = DynamicInferenceEngine(load_model(folder)[0], engine_config(), tokenizer=tokenizer)
    assert alone.generate([prompts[1]], params[1])[0].token_ids == outputs[1].token_ids
