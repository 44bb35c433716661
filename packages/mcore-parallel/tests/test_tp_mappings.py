"""Each tensor/sequence-parallel mapping, forward and backward, on real gloo ranks, against what
a single process computes from every rank's inputs and upstream gradients."""

from __future__ import annotations

import pytest
import torch

from mcore.core.testing import run_ranks
from mcore.parallel import (
    ParallelLayoutError,
    ParallelState,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)

S, B, H = 8, 2, 12  # sequence-first [s, b, h]; s and h split over 2 or 4 ranks


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # Not torch.testing.assert_close inside ranks: with torch.distributed initialized it imports
    # torch.distributed.tensor (and sympy), seconds in every forked rank.
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{what}: max abs error {err:.3g}"


def _per_rank(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """One tensor per rank, the same on every rank (each rank needs all of them as an oracle)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def _forward_backward(fn, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fn(x)
    # (y * grad).sum() rather than y.backward(grad): the latter imports sympy on first use,
    # seconds in every forked rank.
    (y * grad).sum().backward()
    return y.detach(), x.grad


def _check_mappings(rank: int, world_size: int) -> None:
    for tp in (2, 4):
        state = ParallelState(tp=tp)
        group, r, n = state.tp_group, state.tp_rank, state.tp_size
        xs, gs = _per_rank(n, (S, B, H), seed=tp), _per_rank(n, (S, B, H), seed=tp + 100)
        cat = torch.cat

        def shard(t: torch.Tensor, dim: int, i: int = r, n: int = n) -> torch.Tensor:
            return t.chunk(n, dim=dim)[i]

        cases = {
            # name: (mapping, this rank's input, upstream grad, expected output, expected grad)
            "copy_to_tp": (
                copy_to_tensor_parallel_region,
                xs[0],  # a replicated input
                gs[r],
                xs[0],
                sum(gs),
            ),
            "reduce_from_tp": (reduce_from_tensor_parallel_region, xs[r], gs[r], sum(xs), gs[r]),
            "scatter_to_tp": (
                scatter_to_tensor_parallel_region,
                xs[0],
                shard(gs[r], -1),
                shard(xs[0], -1),
                cat([shard(g, -1, i) for i, g in enumerate(gs)], dim=-1),
            ),
            "gather_from_tp": (
                gather_from_tensor_parallel_region,
                shard(xs[r], -1),
                gs[r],
                cat([shard(x, -1, i) for i, x in enumerate(xs)], dim=-1),
                shard(gs[r], -1),
            ),
            "scatter_to_sp": (
                scatter_to_sequence_parallel_region,
                xs[0],
                shard(gs[r], 0),
                shard(xs[0], 0),
                cat([shard(g, 0, i) for i, g in enumerate(gs)]),
            ),
            "gather_from_sp": (
                gather_from_sequence_parallel_region,
                shard(xs[r], 0),
                gs[r],
                cat([shard(x, 0, i) for i, x in enumerate(xs)]),
                shard(sum(gs), 0),  # the gradient is reduce-scattered
            ),
            "gather_from_sp, replicated consumer": (
                lambda x, g: gather_from_sequence_parallel_region(
                    x, g, tensor_parallel_output_grad=False
                ),
                shard(xs[r], 0),
                gs[r],
                cat([shard(x, 0, i) for i, x in enumerate(xs)]),
                shard(gs[r], 0),  # the gradient is only split
            ),
            "reduce_scatter_to_sp": (
                reduce_scatter_to_sequence_parallel_region,
                xs[r],
                shard(gs[r], 0),
                shard(sum(xs), 0),
                cat([shard(g, 0, i) for i, g in enumerate(gs)]),
            ),
        }
        for name, (mapping, x, grad, want_y, want_dx) in cases.items():
            y, dx = _forward_backward(lambda t, m=mapping, g=group: m(t, g), x, grad)
            _assert_close(y, want_y, f"{name} output, tp={tp}")
            _assert_close(dx, want_dx, f"{name} input grad, tp={tp}")

        # A split that does not divide fails before any communication, on every rank alike.
        with pytest.raises(ParallelLayoutError, match=rf"dimension 0 .* over {n} tensor-parallel"):
            scatter_to_sequence_parallel_region(torch.zeros(n + 1, B, H), group)

    # A group of one rank (tp=1 on four ranks) is the identity, as is no group at all.
    single = ParallelState(tp=1).tp_group
    x = torch.ones(4, 4, requires_grad=True)
    for mapping in (reduce_from_tensor_parallel_region, gather_from_sequence_parallel_region):
        assert mapping(x, single) is x and mapping(x, None) is x


def test_mappings_forward_and_backward_on_groups_of_two_and_four() -> None:
    run_ranks(_check_mappings, 4, backend="gloo")


def test_mappings_without_a_group_are_the_identity() -> None:
    x = torch.randn(4, 2, 6, requires_grad=True)
    for mapping in (
        copy_to_tensor_parallel_region,
        reduce_from_tensor_parallel_region,
        scatter_to_tensor_parallel_region,
        gather_from_tensor_parallel_region,
        scatter_to_sequence_parallel_region,
        gather_from_sequence_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    ):
        assert mapping(x, None) is x
