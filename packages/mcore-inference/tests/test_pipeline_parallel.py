"""The engine over pipeline stages (and stages split over TP): each stage holds its layers and
their KV cache, hidden states go point to point between stages, the last stage samples and
shares the tokens, and the stages agree on their KV-cache size. Greedy generations equal
transformers' token for token for Llama, Mixtral (MoE) and DeepSeek-V3 (MLA, a dense first
layer, grouped routing), prompts long enough to be prefilled in chunks beside decodes."""

from __future__ import annotations

import pytest

from mcore.core.testing import run_ranks
from mcore.inference import DynamicInferenceEngine, SamplingParams, load_model
from mcore.parallel import ParallelState

NEW_TOKENS = 8
LENGTHS = (3, 70, 17, 1, 41)


def _generate(rank, world, folder, prompts, config, tp, pp):
    ps = ParallelState(tp=tp, pp=pp)
    model, tokenizer = load_model(folder, parallel_state=ps)
    engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_k=20, seed=7,
                             ignore_eos=True)  # fmt: skip
    outs = engine.generate(prompts, [greedy] * (len(prompts) - 1) + [sampled])
    layers = sorted(layer.layer_number for layer in model.layers.values())
    agreed = engine.stages.agree_blocks(100 - ps.pp_rank)  # a later stage with less room
    return [o.token_ids for o in outs], layers, engine.context.num_blocks, ps.pp_rank, agreed


@pytest.mark.parametrize(
    "case, tp, pp",
    [("llama", 1, 2), ("mixtral", 1, 2), ("deepseek_v3", 1, 2), ("llama", 2, 2),
     ("mixtral", 2, 2), ("deepseek_v3", 2, 2)],
)  # fmt: skip
def test_pipeline_stages_generate_what_transformers_does(
    case, tp, pp, hf_dirs, hf_greedy, random_prompts, engine_config
) -> None:
    folder, hf = hf_dirs[case]
    prompts = random_prompts(LENGTHS, hf.config.vocab_size)
    config = engine_config(max_tokens=48, kv_cache_blocks=None, buffer_size_gb=0.0004)
    ranks = run_ranks(
        _generate, tp * pp, folder, [*prompts, prompts[2]], config, tp, pp, backend="gloo"
    )
    tokens = ranks[0][0]
    assert all(r[0] == tokens for r in ranks)  # every stage recorded the same tokens
    assert len({r[2] for r in ranks}) == 1  # one block count for all stages
    assert {r[4] for r in ranks} == {100 - (pp - 1)}  # the smallest
    stage_layers = {r[3]: r[1] for r in ranks}
    assert stage_layers == {0: [0], 1: [1]}  # each stage holds its own layer
    for prompt, got in zip(prompts, tokens, strict=False):
        assert got == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
