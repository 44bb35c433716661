"""Engines over expert shards: two gloo ranks, each with its own requests and half the
experts, step together (a rank with nothing to do joins with an empty batch); greedy
generations equal transformers' for Mixtral and DeepSeek-V3 (MLA, grouped routing, a shared
expert), and a model without experts, or a layout the engine cannot run, is refused."""

from __future__ import annotations

import pytest

from mcore.core.testing import run_ranks
from mcore.inference import InvalidRequestError, SamplingParams, load_model
from mcore.inference.expert_parallel import ExpertParallelEngine
from mcore.parallel import ParallelState

NEW_TOKENS = 8


def _generate(rank, world, folder, prompts, config):
    model, tokenizer = load_model(folder, parallel_state=ParallelState(ep=world))
    engine = ExpertParallelEngine(model, config, tokenizer=tokenizer)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    # Rank 1 has one short request: it finishes first and then, suspended (an empty step
    # touches no KV cache), joins the group's steps with empty batches.
    if rank == 0:
        tokens = [o.token_ids for o in engine.generate(prompts[:-1], greedy)]
    else:
        rid, tokens = engine.add_request(prompts[-1], greedy), []
        while engine.has_unfinished_requests():
            tokens += [t for d in engine.step() if d.request_id == rid for t in d.token_ids]
        engine.suspend()
        while engine.idle():  # joins the group's steps until nobody has work
            pass
        engine.resume()
        tokens = [tokens]
    experts = [layer.mlp.experts.num_local_experts if hasattr(layer.mlp, "router") else 0
               for layer in model.layers.values()]  # fmt: skip
    engine.generate([], greedy)  # nobody has work: returns at once on both ranks
    return tokens, engine.empty_steps, experts


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_ep2_ranks_serve_their_own_requests_and_equal_transformers(
    case, hf_dirs, hf_greedy, random_prompts, engine_config
) -> None:
    folder, hf = hf_dirs[case]
    prompts = random_prompts((3, 70, 17, 41, 2), hf.config.vocab_size)
    (tokens0, empty0, experts0), (tokens1, empty1, _) = run_ranks(
        _generate, 2, folder, prompts, engine_config(max_tokens=48), backend="gloo"
    )
    assert empty0 == 0 and empty1 > 0  # the rank that finished first kept joining
    total = getattr(hf.config, "num_local_experts", None) or hf.config.n_routed_experts
    assert max(experts0) == total // 2  # each rank holds half the experts
    for prompt, got in zip(prompts, tokens0 + tokens1, strict=True):
        assert got == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"


def _refused(rank, world, folder, config):
    model, _ = load_model(folder, parallel_state=ParallelState(ep=world))
    try:
        ExpertParallelEngine(model, config)
    except InvalidRequestError as error:
        return str(error)
    return None


def test_models_without_experts_are_refused(hf_dirs, engine_config) -> None:
    folder, _ = hf_dirs["llama"]
    refused = run_ranks(_refused, 2, folder, engine_config(), backend="gloo")
    assert all("has no MoE layers" in r and "expert_model_parallel_size = 2" in r for r in refused)


def test_a_failed_collective_raises_expert_group_lost(monkeypatch) -> None:
    """Regression: ``_lost`` (the error once lost) shadowed the method that builds it, so a
    failed collective raised ``TypeError: 'NoneType' object is not callable`` instead."""
    import torch.distributed as dist

    from mcore.inference.expert_parallel import ExpertGroupLostError

    engine = object.__new__(ExpertParallelEngine)  # only the group's bookkeeping: no model
    engine._lost, engine._count_device, engine.group = None, "cpu", None

    def gone(*args, **kwargs):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(dist, "all_reduce", gone)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 1])
    with pytest.raises(ExpertGroupLostError, match=r"global ranks \[0, 1\]\) is gone"):
        engine._agree(3)
    assert isinstance(engine._lost, ExpertGroupLostError)
