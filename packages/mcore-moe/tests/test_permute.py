"""The torch paths of permute/unpermute/sort_chunks_by_index against plain loops over tokens.

The loops are the oracle: they say what the functions mean, one (token, expert) pair at a time,
and autograd through them gives the reference gradients for tokens and probabilities.
"""

from __future__ import annotations

import pytest
import torch

from mcore.moe.permute import permute, sort_chunks_by_index, tokens_per_expert, unpermute

# torch.testing's defaults. torch.testing, like autograd.grad with explicit grad_outputs,
# imports sympy on first use, which takes seconds on a small machine: the tests use neither.
_TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5)}


def assert_close(
    got: torch.Tensor, want: torch.Tensor, *, rtol: float | None = None, atol: float | None = None
) -> None:
    """``got`` matches ``want`` in shape, dtype and values (elementwise, within tolerances)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    default_rtol, default_atol = _TOLERANCES.get(want.dtype, (1.6e-2, 1e-5))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ok = torch.isclose(got, want, rtol=rtol, atol=atol)
    if not bool(ok.all()):
        worst = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{int((~ok).sum())}/{ok.numel()} elements differ, max |diff| {worst}")


def routing(
    num_tokens: int, num_experts: int, topk: int, *, seed: int = 0, empty_expert: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k routing (bool map, probs zero where not routed); ``empty_expert`` gets no token."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64)
    if empty_expert is not None:
        logits[:, empty_expert] = -torch.inf
    top = logits.topk(topk, dim=1)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map.scatter_(1, top.indices, True)
    probs = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    probs.scatter_(1, top.indices, torch.softmax(top.values, dim=1))
    return routing_map, probs


def loop_permute(
    tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert by expert, token by token: the rows, their probabilities, their source tokens."""
    rows, row_probs, sources = [], [], []
    num_tokens, num_experts = routing_map.shape
    for expert in range(num_experts):
        for token in range(num_tokens):
            if routing_map[token, expert]:
                rows.append(tokens[token])
                row_probs.append(probs[token, expert])
                sources.append(token)
    return torch.stack(rows), torch.stack(row_probs), torch.tensor(sources)


def loop_unpermute(
    permuted: torch.Tensor, sources: torch.Tensor, num_tokens: int, probs: torch.Tensor | None
) -> torch.Tensor:
    """Each token the sum of its rows (times their probabilities), in fp64."""
    out = [torch.zeros(permuted.shape[1], dtype=torch.float64) for _ in range(num_tokens)]
    for row, token in enumerate(sources.tolist()):
        weight = probs[row].double() if probs is not None else 1.0
        out[token] = out[token] + permuted[row].double() * weight
    return torch.stack(out)


def grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int = 1) -> list:
    """Gradients of a random linear function of ``outputs`` (same seed, same function)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum(
        (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() for out in outputs
    )
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_permute_matches_the_loop_in_values_and_gradients(topk: int) -> None:
    routing_map, probs = routing(9, 5, topk)
    tokens = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    probs.requires_grad_()

    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs)
    want, want_probs, want_sources = loop_permute(tokens, routing_map, probs)

    assert sorted_indices.dtype == torch.int64
    assert torch.equal(sorted_indices, want_sources)
    assert torch.equal(permuted, want)
    assert torch.equal(permuted_probs, want_probs)
    got_grads = grads([permuted, permuted_probs], [tokens, probs])
    want_grads = grads([want, want_probs], [tokens, probs])
    for got, expected in zip(got_grads, want_grads, strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("with_probs", [True, False])
def test_unpermute_matches_the_loop_in_values_and_gradients(with_probs: bool) -> None:
    routing_map, probs = routing(8, 4, 2)
    _, row_probs, sources = loop_permute(torch.zeros(8, 1), routing_map, probs)
    rows = torch.randn(len(sources), 5, dtype=torch.float64, requires_grad=True)
    row_probs = row_probs.clone().requires_grad_() if with_probs else None

    out = unpermute(rows, sources, 8, probs=row_probs)
    want = loop_unpermute(rows, sources, 8, row_probs)

    assert_close(out, want)
    inputs = [rows] + ([row_probs] if with_probs else [])
    for got, expected in zip(grads([out], inputs), grads([want], inputs), strict=True):
        assert_close(got, expected)


def test_unpermute_of_permute_weights_each_token_by_its_total_probability() -> None:
    routing_map, probs = routing(10, 6, 3)
    tokens = torch.randn(10, 4, dtype=torch.float64)
    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs)
    out = unpermute(permuted, sorted_indices, 10, probs=permuted_probs)
    assert_close(out, tokens * probs.sum(dim=1, keepdim=True))
    assert torch.equal(unpermute(permuted, sorted_indices, 10), tokens * 3)


def test_an_expert_without_tokens_gets_no_rows() -> None:
    routing_map, probs = routing(7, 4, 2, empty_expert=2)
    tokens = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)

    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs)
    want, want_probs, want_sources = loop_permute(tokens, routing_map, probs)

    counts = tokens_per_expert(routing_map)
    assert counts.dtype == torch.int64 and counts[2] == 0 and counts.sum() == 14
    assert torch.equal(sorted_indices, want_sources)
    assert torch.equal(permuted, want) and torch.equal(permuted_probs, want_probs)
    (got,) = grads([permuted], [tokens])
    assert_close(got, grads([want], [tokens])[0])


def test_padding_routes_with_zero_probability_count_as_rows_but_add_nothing() -> None:
    # As when rows are padded per expert for quantised GEMMs: token 0 also goes to an expert it
    # did not choose, with probability 0, so that expert gets a row that must not reach the token.
    routing_map, probs = routing(6, 4, 1)
    extra = int((~routing_map[0]).nonzero()[0])
    routing_map[0, extra] = True
    tokens = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    probs.requires_grad_()

    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs)
    want, want_probs, want_sources = loop_permute(tokens, routing_map, probs)
    assert len(sorted_indices) == 7 and torch.equal(sorted_indices, want_sources)
    out = unpermute(permuted * 2, sorted_indices, 6, probs=permuted_probs)
    want_out = loop_unpermute(want * 2, want_sources, 6, want_probs)

    assert_close(out, 2 * tokens * probs.sum(dim=1, keepdim=True))
    assert_close(out, want_out)
    got_grads, want_grads = grads([out], [tokens, probs]), grads([want_out], [tokens, probs])
    # The zero-probability route still gets a gradient: how the loss would change with it.
    assert got_grads[1][0, extra] != 0
    for got, expected in zip(got_grads, want_grads, strict=True):
        assert_close(got, expected)


def test_explicit_num_out_tokens_keeps_drops_or_pads_rows() -> None:
    routing_map, probs = routing(5, 3, 2)  # 10 routed pairs
    tokens = torch.randn(5, 4, dtype=torch.float64) + 10  # no row of zeros by chance
    implicit = permute(tokens, routing_map, probs)

    same = permute(tokens, routing_map, probs, num_out_tokens=10)
    for got, want in zip(same, implicit, strict=True):
        assert torch.equal(got, want)

    # Fewer rows: the last pairs in expert-major order are dropped, as a capacity would.
    fewer = permute(tokens, routing_map, probs, num_out_tokens=7)
    for got, want in zip(fewer, implicit, strict=True):
        assert torch.equal(got, want[:7])

    # More rows: zero rows of token 0 with probability 0, which unpermute turns into nothing.
    more, more_probs, more_indices = permute(tokens, routing_map, probs, num_out_tokens=12)
    assert torch.equal(more[:10], implicit[0]) and torch.equal(more[10:], torch.zeros(2, 4))
    assert torch.equal(more_probs[10:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(more_indices[10:], torch.zeros(2, dtype=torch.int64))
    assert_close(
        unpermute(more, more_indices, 5, probs=more_probs),
        unpermute(implicit[0], implicit[2], 5, probs=implicit[1]),
    )


def test_bf16_rows_are_exact_copies_and_sums_accumulate_in_fp32() -> None:
    routing_map, probs = routing(16, 4, 4)  # every token to every expert: 4 rows per token
    tokens = torch.randn(16, 8).to(torch.bfloat16)
    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs.float())
    want, _, _ = loop_permute(tokens, routing_map, probs)
    assert permuted.dtype == torch.bfloat16 and torch.equal(permuted, want)
    assert permuted_probs.dtype == torch.float32

    out = unpermute(permuted, sorted_indices, 16, probs=permuted_probs)
    assert out.dtype == torch.bfloat16
    exact = loop_unpermute(permuted, sorted_indices, 16, permuted_probs)
    # One rounding at the end: within half a bf16 ulp of the exact sum.
    assert_close(out, exact.to(torch.bfloat16), rtol=2**-8, atol=1e-6)


def test_sort_chunks_by_index_matches_the_loop() -> None:
    sizes = [2, 0, 3, 1, 4]
    order = [3, 0, 4, 2, 1]
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(10, dtype=torch.float64, requires_grad=True)

    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = [r for c in order for r in range(starts[c], starts[c] + sizes[c])]

    for split_sizes in (sizes, torch.tensor(sizes)):
        want, want_probs = x[rows], probs[rows]
        out, out_probs = sort_chunks_by_index(x, split_sizes, torch.tensor(order), probs=probs)
        assert torch.equal(out, want) and torch.equal(out_probs, want_probs)
        got_grads = grads([out, out_probs], [x, probs])
        for got, expected in zip(got_grads, grads([want, want_probs], [x, probs]), strict=True):
            assert torch.equal(got, expected)
    out, no_probs = sort_chunks_by_index(x, sizes, order)
    assert torch.equal(out, want) and no_probs is None


def test_bad_arguments_say_what_was_expected() -> None:
    routing_map, probs = routing(4, 3, 1)
    with pytest.raises(ValueError, match="bool"):
        permute(torch.randn(4, 2), routing_map.int(), probs)
    with pytest.raises(ValueError, match=r"scatter top-k probs into \[T, E\]"):
        permute(torch.randn(4, 2), routing_map, probs[:, :1])
    with pytest.raises(ValueError, match="permutation"):
        sort_chunks_by_index(torch.randn(4, 2), [2, 2], [0, 0])
    with pytest.raises(ValueError, match="sum to 3"):
        sort_chunks_by_index(torch.randn(4, 2), [2, 1], [1, 0])


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_topk_path_gathers_the_same_rows_and_gradients_as_the_loop(topk: int) -> None:
    # Every token routed to exactly topk experts: permute and unpermute move rows by gathers.
    routing_map, probs = routing(9, 5, topk, seed=topk)
    tokens = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    probs.requires_grad_()

    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs, topk=topk)
    want, want_probs, want_sources = loop_permute(tokens, routing_map, probs)
    assert torch.equal(sorted_indices, want_sources)
    assert torch.equal(permuted, want) and torch.equal(permuted_probs, want_probs)
    got_grads = grads([permuted, permuted_probs], [tokens, probs])
    want_grads = grads([want, want_probs], [tokens, probs])
    for got, expected in zip(got_grads, want_grads, strict=True):
        assert_close(got, expected)

    for with_probs in (True, False):
        rows = (permuted.detach() * 3).requires_grad_()
        row_probs = permuted_probs.detach().clone().requires_grad_() if with_probs else None
        out = unpermute(rows, sorted_indices, 9, probs=row_probs, topk=topk)
        want_out = loop_unpermute(rows, sorted_indices, 9, row_probs)
        assert_close(out, want_out)
        inputs = [rows] + ([row_probs] if with_probs else [])
        for got, expected in zip(grads([out], inputs), grads([want_out], inputs), strict=True):
            assert_close(got, expected)


def test_topk_path_sums_bf16_rows_in_fp32() -> None:
    routing_map, probs = routing(16, 4, 4)
    tokens = torch.randn(16, 8).to(torch.bfloat16)
    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs.float(), topk=4)
    out = unpermute(permuted, sorted_indices, 16, probs=permuted_probs, topk=4)
    assert out.dtype == torch.bfloat16
    exact = loop_unpermute(permuted, sorted_indices, 16, permuted_probs)
    assert_close(out, exact.to(torch.bfloat16), rtol=2**-8, atol=1e-6)


def test_topk_path_checks_the_row_count_it_is_promised() -> None:
    routing_map, probs = routing(5, 3, 2)
    with pytest.raises(ValueError, match="5 tokens make 10 rows; got 7"):
        permute(torch.randn(5, 2), routing_map, probs, num_out_tokens=7, topk=2)
    with pytest.raises(ValueError, match="5 tokens make 15 rows; got 10"):
        unpermute(torch.randn(10, 2), torch.zeros(10, dtype=torch.long), 5, topk=3)


def test_sort_chunks_already_in_order_moves_nothing() -> None:
    x, probs = torch.randn(6, 3), torch.rand(6)
    out, out_probs = sort_chunks_by_index(x, [2, 4], [0, 1], probs=probs)
    assert out is x and out_probs is probs
