"""Weighted blending of datasets, as Megatron-LM's ``BlendedDataset``.

Sample *i* of the blend comes from the dataset whose share so far lags its weight most:
``argmax_d(weight_d * max(i, 1) - taken_d)``, the first on ties. The mix is exact at every
prefix of the blend (within one sample per dataset), not only on average, and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcore.core.data.cache import cached_arrays
from mcore.core.errors import McoreError


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """``["0.7", "a", "0.3", "b"]`` -> ``(["a", "b"], [0.7, 0.3])``; ``["a", "b"]`` -> no weights.

    Megatron's ``--data-path`` form: either prefixes alone, or weight/prefix pairs.
    """
    items = [str(p) for p in data_path]
    if not items:
        raise McoreError("data.data_path is empty; give one or more dataset prefixes")
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            if any(w <= 0 for w in weights):
                raise McoreError(f"data.data_path weights must be > 0, got {weights}")
            return items[1::2], weights
    for item in items:
        try:
            float(item)
        except ValueError:
            continue
        raise McoreError(
            f"data.data_path {items} mixes weights and prefixes: give pairs like "
            "['0.7', 'a', '0.3', 'b'] or prefixes alone"
        )
    return items, None


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def build_blending_indices(weights: Sequence[float], size: int) -> dict[str, np.ndarray]:
    """Which dataset (int16) and which of its samples (int64) each blended sample is."""
    weights = normalize(weights)
    n = len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    taken = [0] * n
    for i in range(size):
        scale = max(float(i), 1.0)
        best, best_error = 0, weights[0] * scale - taken[0]
        for d in range(1, n):
            error = weights[d] * scale - taken[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Items are the chosen dataset's item plus ``"dataset_id"``. Raises if a dataset has fewer
    samples than its share needs (build the parts with a small surplus, as
    :func:`mcore.core.data.corpus.build_gpt_datasets` does).
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float],
        size: int,
        *,
        cache_dir: str | Path | None = None,
        split: str = "train",
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise McoreError(f"{len(datasets)} datasets but {len(weights)} weights")
        if len(datasets) >= 32767:
            raise McoreError("a blend holds at most 32766 datasets")
        self.datasets = list(datasets)
        self.weights = normalize(weights)
        self.size = size
        self.split = split
        self.identifiers = {
            "class": "BlendedDataset",
            "datasets": [getattr(d, "identifiers", repr(d)) for d in self.datasets],
            "split": split,
            "weights": self.weights,
            "size": size,
        }
        arrays, self.from_cache = cached_arrays(
            Path(cache_dir) if cache_dir is not None else None,
            f"BlendedDataset-{split}",
            self.identifiers,
            ("dataset_index", "dataset_sample_index"),
            lambda: build_blending_indices(self.weights, size),
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (count, ds) in enumerate(zip(counts, self.datasets, strict=True)):
            if count > len(ds):
                raise McoreError(
                    f"the {split} blend takes {count} samples from dataset {d} ({ds!r}), which "
                    f"has {len(ds)}; build it with more samples"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} is outside this blend of {self.size} samples")
        d = int(self.dataset_index[idx])
        item = self.datasets[d][int(self.dataset_sample_index[idx])]
        return {"dataset_id": d, **item}

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3g}" for w in self.weights)
        return f"BlendedDataset({self.split}, {self.size} samples, weights [{parts}])"
