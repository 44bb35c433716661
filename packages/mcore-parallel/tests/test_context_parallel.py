"""Context parallelism on real gloo ranks matches single-process causal attention on the full
sequence: outputs and the gradients of q, k and v."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore.core.testing import run_ranks
from mcore.parallel.context_parallel import (
    context_parallel_attention,
    cp_local_positions,
    gather_from_context_parallel,
    split_for_context_parallel,
)
from mcore.parallel.errors import ParallelLayoutError

ATOL = 1e-5
GRADS = ("out", "dq", "dk", "dv")


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got - want).abs().max().item()
    assert error <= ATOL, f"{what}: max abs error {error:.2e} > {ATOL:.0e}"


def test_each_rank_holds_an_early_and_a_late_chunk() -> None:
    assert cp_local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_local_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert cp_local_positions(6, 1, 0).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("cp", [2, 4])
def test_the_layout_covers_the_sequence_once_and_balances_causal_work(cp: int) -> None:
    positions = [cp_local_positions(32, cp, r) for r in range(cp)]
    assert sorted(torch.cat(positions).tolist()) == list(range(32))
    # The query at position p reads p + 1 keys.
    assert len({int((p + 1).sum()) for p in positions}) == 1


def test_sequence_length_must_split_into_2cp_chunks() -> None:
    with pytest.raises(ParallelLayoutError, match=r"sequence length 12 .*\(2 \* 4 = 8\)"):
        cp_local_positions(12, 4, 0)


def test_without_a_cp_group_everything_passes_through() -> None:
    q, k, v = torch.randn(3, 2, 4, 8, 16).unbind(0)
    assert split_for_context_parallel(q, dim=2, cp_group=None) is q
    assert gather_from_context_parallel(q, dim=2, cp_group=None) is q
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(context_parallel_attention(q, k, v, cp_group=None), expected)
    with_positions = context_parallel_attention(
        q, k, v, cp_group=None, position_ids=torch.arange(8) + 100
    )
    _assert_close(with_positions, expected, "with explicit positions")


def _split_and_gather(
    rank: int, world_size: int, x: torch.Tensor, g: torch.Tensor, dx: torch.Tensor
) -> None:
    # new_group is collective: every rank creates both pairs, in the same order.
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    for group in (dist.group.WORLD, pairs[rank % 2]):
        cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        local = split_for_context_parallel(x, dim=1, cp_group=group)
        assert torch.equal(local, x[:, cp_local_positions(x.shape[1], cp, cp_rank)])
        assert torch.equal(gather_from_context_parallel(local, dim=1, cp_group=group), x)

        # Replicated x -> sharded square -> replicated loss: each rank's share of x.grad is its
        # own tokens' gradient, and the shares sum to the full gradient.
        leaf = x.clone().requires_grad_()
        local = split_for_context_parallel(leaf, dim=1, cp_group=group)
        local.retain_grad()
        y = gather_from_context_parallel(local * local, dim=1, cp_group=group)
        (y * g).sum().backward()
        _assert_close(local.grad, split_for_context_parallel(dx, dim=1, cp_group=group), "shard")
        dist.all_reduce(leaf.grad, group=group)
        _assert_close(leaf.grad, dx, "sum of the shares of x.grad")

    with pytest.raises(ParallelLayoutError, match=r"sequence length 12 .*\(2 \* 4 = 8\)"):
        split_for_context_parallel(x[:, :12], dim=1, cp_group=dist.group.WORLD)


def test_split_and_gather_round_trip_on_world_and_on_subgroups() -> None:
    x, g = torch.randn(2, 2, 16, 3).unbind(0)
    leaf = x.clone().requires_grad_()
    ((leaf * leaf) * g).sum().backward()  # the single-process oracle for x.grad
    run_ranks(_split_and_gather, 4, x, g, leaf.grad, backend="gloo")


def _inputs(heads_q: int, heads_kv: int, head_dim: int, v_head_dim: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(heads_q * 100 + heads_kv * 10 + v_head_dim)
    batch, seq = 2, 32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return [
        randn(batch, heads_q, seq, head_dim),
        randn(batch, heads_kv, seq, head_dim),
        randn(batch, heads_kv, seq, v_head_dim),
        randn(batch, heads_q, seq, v_head_dim),  # gradient of the output
    ]


def _full_sequence_attention(q, k, v, grad_out) -> list[torch.Tensor]:
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def _attention_on_ranks(rank: int, world_size: int, cases: dict) -> dict:
    group = dist.group.WORLD
    results = {}
    for name, (q, k, v, grad_out) in cases.items():
        q, k, v = (
            split_for_context_parallel(t, dim=2, cp_group=group).requires_grad_() for t in (q, k, v)
        )
        out = context_parallel_attention(q, k, v, cp_group=group)
        out.backward(split_for_context_parallel(grad_out, dim=2, cp_group=group))
        results[name] = [
            gather_from_context_parallel(t, dim=2, cp_group=group)
            for t in (out.detach(), q.grad, k.grad, v.grad)
        ]

        # Explicit positions, per sample and shifted as after a prefix, give the same mask.
        positions = cp_local_positions(grad_out.shape[2], world_size, rank) + 100
        again = context_parallel_attention(
            q, k, v, cp_group=group, position_ids=positions.expand(q.shape[0], -1)
        )
        _assert_close(again, out, f"{name} with explicit positions")
    return results


ATTENTION_CASES = {
    # name: (heads_q, heads_kv, qk head_dim, v head_dim)
    "mha": (4, 4, 16, 16),
    "gqa": (8, 2, 16, 16),
    "v_head_dim_differs": (4, 4, 24, 16),
}


@pytest.mark.parametrize("cp", [2, 4])
def test_attention_and_its_gradients_match_full_causal_attention(cp: int) -> None:
    cases = {name: _inputs(*dims) for name, dims in ATTENTION_CASES.items()}
    # The oracle runs first: torch imports modules lazily on a process's first SDPA backward
    # (seconds), and forked ranks then inherit them instead of each importing them again.
    expected = {name: _full_sequence_attention(*inputs) for name, inputs in cases.items()}
    by_rank = run_ranks(_attention_on_ranks, cp, cases, backend="gloo")
    for name in cases:
        for rank, results in enumerate(by_rank):
            for what, got, want in zip(GRADS, results[name], expected[name], strict=True):
                _assert_close(got, want, f"{name} {what} on rank {rank}")
