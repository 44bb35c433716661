"""Parity with Megatron-LM itself, where megatron-core is importable (it is no dependency).

To run: ``uv pip install --target /tmp/megref --no-deps "megatron-core<0.19"`` then
``PYTHONPATH=/tmp/megref uv run pytest packages/mcore-core/tests/data/test_megatron_parity.py``.
Skipped otherwise; the hand-packed layout test in test_indexed.py covers the format in CI.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mcore.core.data import ByteTokenizer, GPTDataset, IndexedDataset, IndexedDatasetBuilder
from mcore.core.data.blended import build_blending_indices

pytest.importorskip("megatron.core.datasets.helpers_cpp")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder as MegatronBuilder,
    )
    from megatron.core.datasets.utils import Split


def test_both_writers_produce_the_same_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30000, size=int(rng.integers(0, 300))) for _ in range(50)]
    for dtype in (np.uint16, np.int32):
        theirs = MegatronBuilder(str(tmp_path / "m.bin"), dtype=dtype)
        for doc in docs:
            theirs.add_item(torch.from_numpy(doc.astype(dtype)))
            theirs.end_document()
        theirs.finalize(str(tmp_path / "m.idx"))
        with IndexedDatasetBuilder(tmp_path / "o", dtype) as ours:
            for doc in docs:
                ours.add_document(doc)

        for ext in ("bin", "idx"):
            assert (tmp_path / f"o.{ext}").read_bytes() == (tmp_path / f"m.{ext}").read_bytes()
        megatron_reads_ours = MegatronIndexed(str(tmp_path / "o"))
        for i, doc in enumerate(docs):
            np.testing.assert_array_equal(megatron_reads_ours[i], doc)


@pytest.mark.parametrize(("seq_length", "num_samples"), [(128, 500), (64, 9000), (32, None)])
def test_gpt_indices_and_items_equal_megatrons(
    stdlib_data: IndexedDataset, tmp_path: Path, seq_length: int, num_samples: int | None
) -> None:
    tok = ByteTokenizer()

    class MegatronTokenizer:
        eod, bos, pad, vocab_size = tok.eod, tok.bos, tok.pad, tok.vocab_size
        unique_identifiers = {"class": "byte"}
        special_tokens_dict: dict = {}

    config = GPTDatasetConfig(
        random_seed=9,
        sequence_length=seq_length,
        tokenizer=MegatronTokenizer(),
        split="1",
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(tmp_path / "megatron"),
    )
    documents = np.arange(2, len(stdlib_data), dtype=np.int32)
    prefix = str(stdlib_data.prefix)
    theirs = MegatronGPTDataset(
        MegatronIndexed(prefix), prefix, documents, num_samples, Split.train, config
    )
    ours = GPTDataset(
        stdlib_data,
        documents,
        seq_length=seq_length,
        num_samples=num_samples,
        tokenizer=tok,
        seed=9,
        cache_dir=tmp_path / "ours",
    )

    for name in ("document_index", "sample_index", "shuffle_index"):
        a, b = np.asarray(getattr(ours, name)), np.asarray(getattr(theirs, name))
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for i in np.linspace(0, len(ours) - 1, 20).astype(int).tolist():
        for key, value in ours[i].items():
            assert torch.equal(value, theirs[i][key]), key


def test_blending_indices_equal_megatrons() -> None:
    for weights, size in [([0.7, 0.3], 5000), ([1, 2, 3, 4], 3001)]:
        normalized = (np.asarray(weights, float) / sum(weights)).tolist()
        dataset_index = np.zeros(size, dtype=np.int16)
        sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(
            dataset_index, sample_index, normalized, len(weights), size, False
        )

        ours = build_blending_indices(weights, size)

        np.testing.assert_array_equal(ours["dataset_index"], dataset_index)
        np.testing.assert_array_equal(ours["dataset_sample_index"], sample_index)
