"""The batched sampler: each row follows its own request's parameters."""

from __future__ import annotations

import torch

from mcore.inference.request import Request
from mcore.inference.sampling import Sampler, SamplingParams

VOCAB = 50


def _requests(sampler: Sampler, params: list[SamplingParams]) -> list[Request]:
    return [
        Request(
            i,
            [1],
            p,
            max_new_tokens=10,
            generator=None if p.seed is None else sampler.request_generator(p.seed),
        )
        for i, p in enumerate(params)
    ]


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 400) -> set[int]:
    sampler = Sampler(device="cpu", seed=0)
    rows = logits.expand(n, -1)
    return set(sampler.sample(rows, _requests(sampler, [params] * n)).token_ids)


def _logits() -> torch.Tensor:
    return torch.linspace(4.0, -4.0, VOCAB)[None]  # token 0 most likely, then 1, 2, ...


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    sampler = Sampler(device="cpu", seed=0)
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0)] * 2
    out = sampler.sample(logits, _requests(sampler, params))
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(
        logits[2].argmax()
    )


def test_filters_limit_what_can_be_drawn() -> None:
    logits = _logits()
    assert _draws(SamplingParams(top_k=3), logits) <= {0, 1, 2}
    # Probabilities fall by exp(-8/49) per token; top-p 0.3 keeps only the first few.
    kept = _draws(SamplingParams(top_p=0.3), logits)
    probs = torch.softmax(logits[0], -1)
    smallest = int((probs.cumsum(0) < 0.3).sum()) + 1
    assert kept <= set(range(smallest)) and len(kept) > 1
    floor = _draws(SamplingParams(min_p=0.5), logits)
    assert floor <= {i for i in range(VOCAB) if probs[i] >= 0.5 * probs[0]}
    assert len(_draws(SamplingParams(temperature=1.0), logits)) > 20


def test_a_seeded_request_draws_the_same_tokens_whatever_is_batched_with_it() -> None:
    g = torch.Generator().manual_seed(2)
    mine_logits = torch.randn(VOCAB, generator=g)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=7)

    def draws(others: list[SamplingParams], row: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(device="cpu", seed=sampler_seed)
        params = [*others[:row], mine, *others[row:]]
        requests = _requests(sampler, params)
        logits = torch.randn(len(params), VOCAB, generator=g)
        logits[row] = mine_logits
        return [sampler.sample(logits, requests).token_ids[row] for _ in range(8)]

    alone = draws([], 0, 0)
    assert draws([SamplingParams(), SamplingParams(temperature=0)], 0, 1) == alone
    assert draws([SamplingParams(top_k=2), SamplingParams(seed=3)], 2, 123) == alone
    assert len(set(alone)) > 1  # it really samples


def test_logprobs_are_the_models_own_and_top_alternatives_come_sorted() -> None:
    sampler = Sampler(device="cpu", seed=0)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.5)]
    out = sampler.sample(logits, _requests(sampler, params))
    reference = torch.log_softmax(logits[0], -1)
    assert out.logprobs[0] == float(reference[out.token_ids[0]])
    assert list(out.top_logprobs[0]) == reference.topk(3).indices.tolist()
    assert out.logprobs[1] is None and out.top_logprobs[1] is None


def test_padded_vocabulary_rows_are_never_sampled() -> None:
    sampler = Sampler(device="cpu", seed=0, vocab_size=10)
    logits = torch.zeros(64, VOCAB)
    logits[:, 40] = 100.0  # a padding row the model happens to like
    out = sampler.sample(logits, _requests(sampler, [SamplingParams(temperature=1.0)] * 64))
    assert max(out.token_ids) < 10
    greedy = sampler.sample(logits[:1], _requests(sampler, [SamplingParams(temperature=0)]))
    assert greedy.token_ids[0] < 10


def test_sampling_params_round_trip_through_plain_dicts() -> None:
    params = SamplingParams(max_tokens=5, stop="x", stop_token_ids=[3], seed=1, logprobs=2)
    assert params.stop == ("x",) and params.stop_token_ids == (3,)
    assert SamplingParams.from_dict(params.to_dict()) == params
