"""The flat-buffer layout: shards are DTensor's Shard(0) chunks, gathers and grads round-trip."""

from __future__ import annotations

import pytest
import torch

from megatron_fsdp.layout import FlatLayout

SHAPES = [torch.Size(s) for s in [(5, 3), (1,), (61, 32), (7,), (2, 2, 3), (0, 4)]]


def _fulls(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_holds_the_torch_chunk_of_every_parameter(world: int) -> None:
    layout = FlatLayout.build(SHAPES, world)
    fulls = _fulls()
    for rank in range(world):
        shard = torch.zeros(layout.shard_numel)
        for i, full in enumerate(fulls):
            layout.copy_shard_from_full(shard, i, full, rank)
        for i, full in enumerate(fulls):
            chunks = list(torch.chunk(full, world)) if full.shape[0] else []
            expected = chunks[rank] if rank < len(chunks) else full[:0]
            torch.testing.assert_close(layout.local_view(shard, i, rank), expected)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gathered_shards_copy_out_to_the_full_parameters(world: int) -> None:
    layout = FlatLayout.build(SHAPES, world)
    fulls = _fulls()
    shards = []
    for rank in range(world):
        shard = torch.zeros(layout.shard_numel)
        for i, full in enumerate(fulls):
            layout.copy_shard_from_full(shard, i, full, rank)
        shards.append(shard)
    gathered = torch.cat(shards)  # what all_gather_into_tensor produces
    unsharded = torch.empty(layout.unsharded_numel)
    layout.copy_out(gathered, unsharded)
    for i, full in enumerate(fulls):
        torch.testing.assert_close(layout.unsharded_view(unsharded, i), full)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_full_gradients_land_where_reduce_scatter_gives_each_rank_its_shard(world: int) -> None:
    layout = FlatLayout.build(SHAPES, world)
    grads = _fulls(seed=1)
    acc = torch.zeros(layout.unsharded_numel)
    for i, grad in enumerate(grads):
        layout.add_full_grad(acc, i, grad, alpha=0.5)
        layout.add_full_grad(acc, i, grad, alpha=0.5)  # micro-batches sum
    for rank, shard in enumerate(acc.view(world, layout.shard_numel)):
        expected = torch.zeros(layout.shard_numel)
        for i, grad in enumerate(grads):
            layout.copy_shard_from_full(expected, i, grad, rank)
        torch.testing.assert_close(shard, expected)  # padding stays zero too


def test_a_scalar_parameter_is_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        FlatLayout.build([torch.Size([])], 2)
