"""The engine's behaviour: a full KV cache, refused requests, prefix sharing, suspend/resume,
refit, aborts and stops. Reference outputs come from the same model with a roomy cache."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from mcore.inference import (
    ContextOverflowError,
    DynamicInferenceEngine,
    InvalidRequestError,
    SamplingParams,
    load_model,
)
from mcore.inference.errors import EngineStateError
from mcore.inference.request import OutputCollector

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)


def _seeded(seed: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=16, temperature=1.0, top_k=40, seed=seed, ignore_eos=True, logprobs=0
    )


def test_more_requests_than_the_cache_holds_all_complete_correctly(
    llama_engine_factory, random_prompts
) -> None:
    roomy = llama_engine_factory()
    prompts = random_prompts([20 + 3 * i for i in range(12)], roomy.tokenizer.vocab_size)
    params = [GREEDY if i % 3 else _seeded(i) for i in range(len(prompts))]
    expected = roomy.generate(prompts, params)

    # 12 blocks of 8 tokens: room for about two of these 40-60 token requests at a time.
    tight = llama_engine_factory(kv_cache_blocks=13, max_requests=8)
    assert sum(len(p) + 16 for p in prompts) > 12 * 8 * 5
    outputs = tight.generate(prompts, params)
    assert tight.stats().preemptions > 0  # requests lost their cache and were recomputed
    for want, got in zip(expected, outputs, strict=True):
        assert got.token_ids == want.token_ids
        assert got.finish_reason == "length"
    assert not tight.has_unfinished_requests()
    assert tight.context.kv.usage() == 0.0  # every block came back


def test_a_prompt_that_can_never_fit_is_refused_with_its_request_id(llama_engine_factory) -> None:
    engine = llama_engine_factory(max_sequence_length=64, kv_cache_blocks=9)
    with pytest.raises(ContextOverflowError) as info:
        engine.add_request([5] * 64, GREEDY, request_id="too-long")
    assert info.value.request_id == "too-long" and info.value.limit == 64
    assert "max_sequence_length" in str(info.value)
    with pytest.raises(ContextOverflowError) as info:
        engine.add_request([5] * 40, SamplingParams(max_tokens=30), request_id=7)
    assert info.value.request_id == 7 and "max_tokens" in str(info.value)
    assert not engine.has_unfinished_requests()
    # 4 usable blocks of 8 tokens: 32 tokens, whatever max_sequence_length allows.
    small = llama_engine_factory(max_sequence_length=64, kv_cache_blocks=5)
    with pytest.raises(ContextOverflowError, match="KV cache") as info:
        small.add_request([5] * 20, SamplingParams(max_tokens=20), request_id="big")
    assert info.value.request_id == "big" and info.value.limit == 32


@pytest.mark.parametrize("budget", [0, -3])
def test_a_zero_or_negative_token_budget_is_rejected_at_submission(budget) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=budget)
    assert info.value.field == "max_tokens"


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("logprobs", -1),
     ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1])],
)  # fmt: skip
def test_bad_sampling_parameters_name_the_field(field, value) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field and field in str(info.value)


def test_bad_prompts_are_refused_and_nothing_is_queued(llama_engine_factory) -> None:
    engine = llama_engine_factory()
    vocab = engine.model.config.vocab_size
    for prompt, words in [([], "empty"), ([vocab + 5], "token ids"), ([1, "a"], "token ids")]:
        with pytest.raises(InvalidRequestError, match=words) as info:
            engine.add_request(prompt, GREEDY, request_id="bad")
        assert info.value.field == "prompt" and info.value.request_id == "bad"
    engine.add_request([3, 4], GREEDY, request_id="dup")
    with pytest.raises(InvalidRequestError, match="already"):
        engine.add_request([3, 4], GREEDY, request_id="dup")
    assert engine.num_requests == 1


def test_identical_prompt_prefixes_share_cache_blocks(llama_engine_factory, random_prompts) -> None:
    engine = llama_engine_factory()
    (shared,) = random_prompts([40], engine.tokenizer.vocab_size)
    first = engine.generate([[*shared, 7, 8]], GREEDY)[0]
    hits_before = engine.stats().prefix_cache_hit_tokens
    # Same 40-token prefix, another ending: its first 5 blocks come from the cache.
    second_id = engine.add_request([*shared, 9], GREEDY)
    engine.step()
    assert engine.stats().prefix_cache_hit_tokens - hits_before == 40
    request = engine.get_request(second_id)
    assert request.metrics.num_cached_prompt_tokens == 40
    while engine.has_unfinished_requests():
        engine.step()
    fresh = llama_engine_factory(enable_prefix_caching=False)
    assert (
        fresh.generate([[*shared, 9]], GREEDY)[0].token_ids
        == engine.generate([[*shared, 9]], GREEDY)[0].token_ids
    )
    assert first.metrics.num_cached_prompt_tokens == 0


@pytest.mark.parametrize("mode", ["offload", "recompute"])
def test_suspend_and_resume_mid_generation_gives_the_same_tokens(
    mode, llama_engine_factory, random_prompts
) -> None:
    reference = llama_engine_factory()
    prompts = random_prompts([5, 33, 12, 60], reference.tokenizer.vocab_size)
    params = [GREEDY, _seeded(1), GREEDY, _seeded(2)]
    expected = reference.generate(prompts, params)

    engine = llama_engine_factory()
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
    collectors = defaultdict(OutputCollector)

    def step() -> None:
        for delta in engine.step():
            collectors[delta.request_id].add(delta)

    for _ in range(6):
        step()
    assert engine.context.memory_bytes() > 0
    engine.suspend(mode)
    assert engine.suspended and engine.context.memory_bytes() == 0
    with pytest.raises(EngineStateError, match="resume"):
        engine.step()
    engine.add_request(prompts[0], GREEDY, request_id="while-suspended")  # queued, not run
    engine.resume()
    while engine.has_unfinished_requests():
        step()
    done = {rid: c.output() for rid, c in collectors.items()}
    assert all(c.finished for c in collectors.values())
    for rid, want in zip(ids, expected, strict=True):
        assert done[rid].token_ids == want.token_ids
        if mode == "offload":  # the same KV bits: the same log-probabilities, exactly
            assert done[rid].logprobs == want.logprobs
    assert done["while-suspended"].token_ids == expected[0].token_ids


def test_update_weights_refits_the_model_and_clears_the_prefix_cache(
    hf_dirs, engine_config, random_prompts
) -> None:
    llama_dir = hf_dirs["llama"][0]
    model, tokenizer = load_model(llama_dir)
    engine = DynamicInferenceEngine(model, engine_config(), tokenizer=tokenizer)
    (prompt,) = random_prompts([30], tokenizer.vocab_size)
    before = engine.generate([prompt], GREEDY)[0]

    trained, _ = load_model(llama_dir)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.update_weights(trained)
    after = engine.generate([prompt], GREEDY)[0]
    refit_reference = DynamicInferenceEngine(trained, engine_config(), tokenizer=tokenizer)
    assert after.token_ids == refit_reference.generate([prompt], GREEDY)[0].token_ids
    assert after.token_ids != before.token_ids
    assert after.metrics.num_cached_prompt_tokens == 0  # no KV of the old weights reused

    with pytest.raises(InvalidRequestError, match="no parameters named"):
        engine.update_weights({"not.a.weight": torch.zeros(1)})
    name, _value = next(iter(trained.state_dict().items()))
    with pytest.raises(InvalidRequestError, match="shape"):
        engine.update_weights({name: torch.zeros(3, 3)}, strict=False)


def test_abort_frees_the_request_and_reports_it(llama_engine_factory) -> None:
    engine = llama_engine_factory()
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True))
    (first,) = engine.step()
    last = engine.abort(rid)
    assert last.finished and last.finish_reason == "abort" and last.num_generated == 1
    assert len(first.token_ids) == 1 and last.token_ids == []  # reported once, by the step
    assert engine.abort(rid) is None
    assert not engine.has_unfinished_requests() and engine.context.kv.usage() == 0.0


def test_stop_tokens_and_strings_end_a_request(llama_engine_factory, random_prompts) -> None:
    engine = llama_engine_factory()
    (prompt,) = random_prompts([10], engine.tokenizer.vocab_size)
    free = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    tokens, text = free[0].token_ids, free[0].text
    assert text == engine.tokenizer.decode(tokens)

    stop_id = tokens[5]
    by_token = engine.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id])
    )[0]
    first = tokens.index(stop_id)
    assert by_token.token_ids == tokens[: first + 1]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", stop_id)

    cut = len(text) // 2
    stop = text[cut : cut + 3]
    by_string = engine.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    )[0]
    assert by_string.finish_reason == "stop" and by_string.stop_reason == stop
    assert by_string.text == text[: text.index(stop)]

    # The tokenizer's end-of-sequence id stops a request unless ignore_eos is set.
    eos = next(iter(engine.eos_token_ids))
    rid = engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0))
    engine.step()
    request = engine.get_request(rid)
    request.append_token(eos, None, None)
    assert request.finish_reason == "stop" and request.stop_reason == eos


def test_stop_strings_need_a_tokenizer(hf_dirs, engine_config) -> None:
    model, _ = load_model(hf_dirs["llama"][0])
    engine = DynamicInferenceEngine(model, engine_config())
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request([1, 2], SamplingParams(stop=["x"]))
    assert info.value.field == "stop"
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        engine.add_request("text", SamplingParams())


def test_step_budget_must_cover_one_decode_per_request(hf_dirs, engine_config) -> None:
    model, _ = load_model(hf_dirs["llama"][0])
    with pytest.raises(InvalidRequestError, match="max_tokens") as info:
        DynamicInferenceEngine(model, engine_config(max_tokens=4, max_requests=8))
    assert info.value.field == "max_tokens"
