"""The engine over a model split across tensor-parallel ranks: every TP rank loads only its
shard, all ranks step together with identical scheduling and sampling, and greedy generations
equal transformers' token for token (Llama, Mixtral's MoE, DeepSeek-V3's MLA and grouped
routing), with long prompts prefilled in chunks beside decodes."""

from __future__ import annotations

import pytest
import torch

from mcore.core import McoreError
from mcore.core.testing import run_ranks
from mcore.inference import DynamicInferenceEngine, SamplingParams, load_model
from mcore.parallel import ParallelState

NEW_TOKENS = 8
LENGTHS = (3, 70, 17, 1, 41, 9)


def _generate(rank, world, folder, prompts, config):
    model, tokenizer = load_model(folder, parallel_state=ParallelState(tp=world))
    engine = DynamicInferenceEngine(model, config, tokenizer=tokenizer)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_k=20, seed=7,
                             ignore_eos=True)  # fmt: skip
    outs = engine.generate(prompts, [greedy] * (len(prompts) - 1) + [sampled])
    local_heads = model.layers["0"].self_attention.local_heads
    refused = None
    if any(hasattr(layer.mlp, "router") for layer in model.layers.values()):
        # An MoE model under TP without sequence parallelism serves but does not train.
        model.train()
        try:
            model(torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]]))
        except ValueError as error:
            refused = str(error)
    return [o.token_ids for o in outs], local_heads, refused


@pytest.mark.parametrize("case", ["llama", "mixtral", "deepseek_v3"])
def test_tp2_greedy_equals_transformers(
    case, hf_dirs, hf_greedy, random_prompts, engine_config
) -> None:
    folder, hf = hf_dirs[case]
    prompts = random_prompts(LENGTHS, hf.config.vocab_size)
    config = engine_config(max_tokens=48)  # the 70- and 41-token prompts prefill in chunks
    ranks = run_ranks(_generate, 2, folder, [*prompts, prompts[2]], config, backend="gloo")
    (tokens, heads, refused), (other_tokens, other_heads, _) = ranks
    assert tokens == other_tokens  # both ranks decided and sampled alike, the seeded row too
    assert heads == other_heads == hf.config.num_attention_heads // 2  # each holds half
    for prompt, got in zip(prompts, tokens, strict=False):
        assert got == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
    if case != "llama":  # training such a model needs sequence parallelism, and says so
        assert "need sequence parallelism (parallel.sequence_parallel = true) to train" in refused


def test_layouts_the_engine_cannot_run_are_refused(hf_dirs) -> None:
    folder, _ = hf_dirs["llama"]

    class ContextParallel:
        pp_size, cp_size = 1, 2

    with pytest.raises(McoreError, match="does not run context parallelism yet"):
        load_model(folder, parallel_state=ContextParallel())
