"""Blending: Megatron's data_path forms, and a mix that keeps its proportions at every prefix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mcore.core import McoreError
from mcore.core.data import (
    BlendedDataset,
    ByteTokenizer,
    GPTDataset,
    IndexedDataset,
    parse_data_path,
)


def test_data_path_forms() -> None:
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(McoreError, match="mixes weights and prefixes"):
        parse_data_path(["0.7", "a", "b"])
    with pytest.raises(McoreError, match="must be > 0"):
        parse_data_path(["0", "a", "1", "b"])


def halves(data: IndexedDataset, tmp_path: Path, size: int) -> list[GPTDataset]:
    mid = len(data) // 2
    return [
        GPTDataset(
            data,
            docs,
            seq_length=32,
            num_samples=size,
            tokenizer=ByteTokenizer(),
            seed=3,
            cache_dir=tmp_path,
        )
        for docs in (np.arange(mid), np.arange(mid, len(data)))
    ]


def test_blend_keeps_the_weights_at_every_prefix(
    stdlib_data: IndexedDataset, tmp_path: Path
) -> None:
    parts = halves(stdlib_data, tmp_path, 800)

    blend = BlendedDataset(parts, [0.7, 0.3], 1000, cache_dir=tmp_path)

    taken = np.cumsum(np.eye(2)[blend.dataset_index], axis=0)  # samples per dataset so far
    expected = np.outer(np.arange(1, 1001), [0.7, 0.3])
    assert np.abs(taken - expected).max() <= 1.0
    assert taken[-1].tolist() == [700, 300]
    for i in (0, 1, 2, 500, 999):
        d, j = int(blend.dataset_index[i]), int(blend.dataset_sample_index[i])
        item = blend[i]
        assert item["dataset_id"] == d and torch.equal(item["tokens"], parts[d][j]["tokens"])


def test_blend_indices_are_cached(stdlib_data: IndexedDataset, tmp_path: Path) -> None:
    parts = halves(stdlib_data, tmp_path, 300)

    first = BlendedDataset(parts, [1, 3], 400, cache_dir=tmp_path)
    second = BlendedDataset(parts, [1, 3], 400, cache_dir=tmp_path)

    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.dataset_index, second.dataset_index)


def test_blend_refuses_to_oversample_a_dataset(stdlib_data: IndexedDataset, tmp_path: Path) -> None:
    parts = halves(stdlib_data, tmp_path, 10)
    small = min(len(p) for p in parts)

    with pytest.raises(McoreError, match="build it with more samples"):
        BlendedDataset(parts, [0.5, 0.5], 4 * small + 10)
