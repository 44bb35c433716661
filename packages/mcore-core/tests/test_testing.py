"""The shared distributed test helper runs real gloo process groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mcore.core.testing import RankError, run_ranks


def test_ranks_form_a_real_process_group_and_return_results_in_order() -> None:
    def all_reduce(rank: int, world_size: int, scale: float) -> torch.Tensor:
        t = torch.full((3,), float(rank + 1)) * scale
        dist.all_reduce(t)
        return t

    results = run_ranks(all_reduce, 3, 2.0, backend="gloo")
    expected = torch.full((3,), 2.0 * (1 + 2 + 3))
    assert len(results) == 3
    for r in results:
        torch.testing.assert_close(r, expected)


def test_an_exception_on_one_rank_is_raised_with_its_traceback() -> None:
    def fails_on_rank_one(rank: int, world_size: int) -> int:
        if rank == 1:
            raise ValueError("bad shard on rank one")
        return rank

    with pytest.raises(RankError, match=r"rank 1 of 2 raised:(.|\n)*bad shard on rank one"):
        run_ranks(fails_on_rank_one, 2, backend="gloo")


def test_a_rank_that_dies_is_reported() -> None:
    def dies(rank: int, world_size: int) -> None:
        import os

        if rank == 0:
            os._exit(3)

    with pytest.raises(RankError, match="rank 0 of 2 died with exit code 3"):
        run_ranks(dies, 2, backend="gloo", timeout_s=30)


def test_a_forked_rank_computes_after_the_parent_ran_threaded_kernels() -> None:
    """The parent starts OpenMP's worker pool; a forked rank must still run parallel kernels
    (with the pool it inherited it would wait forever on workers that do not exist)."""
    torch.set_num_threads(2)
    a = torch.randn(1500, 1500)
    (a @ a).sum()

    def matmul(rank: int, world_size: int) -> float:
        b = torch.ones(1500, 1500)
        return float((b @ b).exp().sum().log()) + torch.get_num_threads()

    assert run_ranks(matmul, 1, backend="gloo", timeout_s=60)[0] > 0
