"""Pieces of global tensors: every layout's pieces tile the global tensor with this rank's data.

Each test builds the full tensor, cuts it the way a layout holds it, and checks that the pieces
(views of the rank's own storage) sit at the right global offsets and, over all ranks, cover
every element exactly once.
"""

from __future__ import annotations

import random

import pytest
import torch

from mcore.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from mcore.parallel.sharding import Layout, flat_range_regions, pieces


def _cover(shape, all_pieces, full: torch.Tensor) -> None:
    """The pieces hold ``full``'s values and together cover it once."""
    covered = torch.zeros(shape, dtype=torch.int)
    for data, offset in all_pieces:
        box = tuple(slice(o, o + s) for o, s in zip(offset, data.shape, strict=True))
        torch.testing.assert_close(data, full[box])
        covered[box] += 1
    assert bool((covered == 1).all()), covered


@pytest.mark.parametrize("shape", [(7,), (4, 3), (3, 4, 5), (2, 3, 1, 4)])
def test_a_flat_range_becomes_few_contiguous_boxes(shape) -> None:
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    rng = random.Random(0)
    n = full.numel()
    for _ in range(40):
        start = rng.randrange(n + 1)
        end = rng.randrange(start, n + 1)
        flat = full.reshape(-1)[start:end].clone()
        boxes = flat_range_regions(flat, shape, start)
        assert len(boxes) <= 2 * len(shape)
        covered = torch.zeros(shape, dtype=torch.int)
        for data, offset in boxes:
            assert data.data_ptr() >= flat.data_ptr()  # a view of the flat range, no copy
            box = tuple(slice(o, o + s) for o, s in zip(offset, data.shape, strict=True))
            torch.testing.assert_close(data, full[box])
            covered[box] += 1
        assert int(covered.sum()) == end - start and int(covered.max()) <= 1


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_column_parallel_partitions_map_back_to_the_full_weight(tp: int) -> None:
    # GQA QKV: q 8 rows, k and v 4 rows each, split over TP separately.
    full = torch.randn(16, 6)
    got = []
    for rank in range(tp):
        layer = ColumnParallelLinear(6, 16, partitions=[8, 4, 4], bias=True)
        layer.tp_size, layer.tp_rank = tp, rank
        layer.local_partitions = [8 // tp, 4 // tp, 4 // tp]
        local = layer._shard_rows(full)
        layer.weight = torch.nn.Parameter(local)
        layout = layer.shard_layout("weight")
        assert layout.global_shape == (16, 6)
        got += pieces(layout, [(local, (0, 0))])
    _cover((16, 6), got, full)


def test_row_parallel_and_vocab_parallel_layouts() -> None:
    full = torch.randn(6, 8)
    row, vocab = [], []
    for rank in range(2):
        layer = RowParallelLinear(8, 6)
        layer.tp_size, layer.tp_rank = 2, rank
        layer.weight = torch.nn.Parameter(full[:, 4 * rank : 4 * rank + 4].clone())
        row += pieces(layer.shard_layout("weight"), [(layer.weight.data, (0, 0))])
        emb = VocabParallelEmbedding(8, 6)
        emb.tp_size, emb.tp_rank = 2, rank
        emb.weight = torch.nn.Parameter(full.t()[4 * rank : 4 * rank + 4].clone())
        vocab += pieces(emb.shard_layout("weight"), [(emb.weight.data, (0, 0))])
    assert layer.shard_layout("bias") is None  # the row-parallel bias is replicated
    _cover((6, 8), row, full)
    _cover((8, 6), vocab, full.t())


def test_layouts_compose_over_two_dims_and_with_a_held_region() -> None:
    # Stacked experts [E, 2F, H]: EP splits dim 0, ETP splits gate and up halves of dim 1;
    # each rank then holds (as FSDP or the distributed optimizer would) part of its tensor.
    experts, ffn, hidden, ep, etp = 4, 4, 3, 2, 2
    full = torch.randn(experts, 2 * ffn, hidden)
    got = []
    for ep_rank in range(ep):
        for etp_rank in range(etp):
            mine = full[ep_rank * 2 : ep_rank * 2 + 2]
            gate, up = mine.chunk(2, dim=1)
            local = torch.cat([gate.chunk(etp, 1)[etp_rank], up.chunk(etp, 1)[etp_rank]], 1)
            layout = Layout.split(
                local.shape, {0: (ep_rank, ep, None), 1: (etp_rank, etp, [ffn // etp] * 2)}
            )
            assert layout.global_shape == tuple(full.shape)
            # Held: a flat range of the local tensor, split in two halves between two holders.
            flat = local.reshape(-1)
            half = flat.numel() // 2 + 1
            for start, end in ((0, half), (half, flat.numel())):
                regions = flat_range_regions(flat[start:end], tuple(local.shape), start)
                got += pieces(layout, regions)
    _cover(tuple(full.shape), got, full)


def test_a_replicated_tensor_is_one_piece_at_the_origin() -> None:
    t = torch.randn(3, 2)
    ((data, offset),) = pieces(Layout.replicated(t.shape), [(t, (0, 0))])
    assert offset == (0, 0) and data.data_ptr() == t.data_ptr()
