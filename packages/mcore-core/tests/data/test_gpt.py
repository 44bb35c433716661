"""GPTDataset on real text: samples are windows of the shuffled document stream, indices are
deterministic and cached on disk, splits are disjoint, and an ambiguous PAD is handled."""

from __future__ import annotations

import itertools
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mcore.core.data import ByteTokenizer, GPTDataset, IndexedDataset, split_ranges
from mcore.core.data import gpt as gpt_module
from mcore.core.data import tokenizer as tokenizer_module
from mcore.core.data.tokenizer import AmbiguousPadTokenWarning


def make(data: IndexedDataset, tmp_path: Path, **kwargs) -> GPTDataset:
    options = {"seq_length": 64, "num_samples": 200, "tokenizer": ByteTokenizer(), "seed": 1}
    options.update(kwargs)
    documents = options.pop("documents", None)
    return GPTDataset(data, documents, cache_dir=tmp_path / "cache", **options)


def test_samples_are_windows_of_the_shuffled_document_stream(
    stdlib_data: IndexedDataset, tmp_path: Path
) -> None:
    ds = make(stdlib_data, tmp_path)
    stream = np.concatenate([stdlib_data[int(d)] for d in ds.document_index])

    assert len(ds) >= 200
    for i in range(len(ds)):
        start = int(ds.shuffle_index[i]) * ds.seq_length
        np.testing.assert_array_equal(ds.sample_tokens(i), stream[start : start + 65])
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_items_hold_next_token_labels(stdlib_data: IndexedDataset, tmp_path: Path) -> None:
    ds = make(stdlib_data, tmp_path, eod_mask_loss=True, reset_position_ids=True)
    i = next(i for i in range(len(ds)) if ByteTokenizer().eod in ds.sample_tokens(i)[1:-2])

    item = ds[i]
    text = torch.from_numpy(ds.sample_tokens(i))

    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(v.shape == (64,) for v in item.values())
    assert torch.equal(item["tokens"], text[:-1]) and torch.equal(item["labels"], text[1:])
    eod = int(torch.nonzero(item["tokens"] == ByteTokenizer().eod)[0])
    assert item["loss_mask"][eod] == 0 and item["loss_mask"].sum() >= 64 - 2
    positions = item["position_ids"].tolist()
    assert positions[: eod + 1] == list(range(eod + 1))  # the first document, then a restart
    assert positions[eod + 1 : eod + 3] == [0, 1]


def test_same_seed_gives_the_same_samples(stdlib_data: IndexedDataset, tmp_path: Path) -> None:
    a = make(stdlib_data, tmp_path / "a")
    b = make(stdlib_data, tmp_path / "b")
    c = make(stdlib_data, tmp_path / "c", seed=2)

    assert not b.from_cache
    for i in (0, 7, 150):
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)


def test_indices_are_cached_and_reused(
    stdlib_data: IndexedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make(stdlib_data, tmp_path)

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("indices were rebuilt instead of loaded from the cache")

    monkeypatch.setattr(gpt_module, "build_gpt_indices", must_not_rebuild)
    second = make(stdlib_data, tmp_path)

    assert not first.from_cache and second.from_cache
    assert isinstance(second.sample_index, np.memmap)  # loaded from the .npy, not rebuilt
    np.testing.assert_array_equal(first.sample_index, second.sample_index)
    cached = (tmp_path / "cache").glob("*GPTDataset*")
    names = sorted(p.name.split("-", 1)[1] for p in cached if not p.name.startswith("."))
    assert names == [
        f"GPTDataset-train-{n}"
        for n in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")
    ]
    with pytest.raises(AssertionError, match="rebuilt"):
        make(stdlib_data, tmp_path, num_samples=300)  # other parameters, other cache entry


def test_batches_from_loader_workers_match_direct_reads(
    stdlib_data: IndexedDataset, tmp_path: Path
) -> None:
    ds = make(stdlib_data, tmp_path)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives

    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batch = next(iter(loader))

    assert batch["tokens"].shape == (8, 64)
    for i in range(8):
        assert torch.equal(batch["tokens"][i], ds[i]["tokens"])
        assert torch.equal(clone[i]["labels"], ds[i]["labels"])


def test_split_ranges_are_disjoint_and_cover_every_document(
    stdlib_data: IndexedDataset, tmp_path: Path
) -> None:
    for split in ("969,30,1", "8,1,1", "1,1,1", "98,2", "100"):
        ranges = [r for r in split_ranges(split, 1000) if r is not None]
        assert ranges[0][0] == 0 and ranges[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("8,2,0", 10)[2] is None

    train, valid, test = split_ranges("8,1,1", len(stdlib_data))
    datasets = [
        make(stdlib_data, tmp_path, documents=np.arange(*r), split=name, num_samples=50)
        for name, r in (("train", train), ("valid", valid), ("test", test))
    ]
    used = [set(ds.document_index.tolist()) for ds in datasets]
    assert used[0] == set(range(*train)) and used[1] == set(range(*valid))
    assert not (used[0] & used[1]) and not (used[1] & used[2]) and not (used[0] & used[2])


def test_more_samples_than_an_epoch_repeat_every_document(
    stdlib_data: IndexedDataset, tmp_path: Path
) -> None:
    documents = np.arange(3)
    tokens = int(stdlib_data.sequence_lengths[:3].sum())
    wanted = 3 * tokens // 64

    ds = make(stdlib_data, tmp_path, documents=documents, num_samples=wanted)

    assert len(ds) >= wanted
    counts = np.bincount(ds.document_index, minlength=3)
    assert counts.tolist() in ([3, 3, 3], [4, 4, 4])


class EodPaddedTokenizer(ByteTokenizer):
    """A tokenizer whose PAD is its EOD, as GPT-2's tokenizer.json gives."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = self.eod


def eod_label_mask(ds: GPTDataset) -> list[float]:
    i = next(i for i in range(len(ds)) if ds.eod in ds.sample_tokens(i)[1:])
    item = ds[i]
    return item["loss_mask"][item["labels"] == ds.eod].tolist()


def test_pad_colliding_with_eod_warns_once_and_keeps_eod_in_the_loss(
    stdlib_data: IndexedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer_module, "_warned_pad", set())
    tok = EodPaddedTokenizer()

    with pytest.warns(AmbiguousPadTokenWarning, match="PAD id 256 is also its EOD"):
        ds = make(stdlib_data, tmp_path, tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = make(stdlib_data, tmp_path, tokenizer=tok, split="valid")  # no second warning

    assert ds.pad_id == again.pad_id == gpt_module.PAD_SENTINEL
    assert set(eod_label_mask(ds)) == {1.0}  # real end-of-document labels are learned


def test_allowing_ambiguous_pad_masks_eod_too(
    stdlib_data: IndexedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer_module, "_warned_pad", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = make(
            stdlib_data, tmp_path, tokenizer=EodPaddedTokenizer(), allow_ambiguous_pad_tokens=True
        )

    assert ds.pad_id == ds.eod
    assert set(eod_label_mask(ds)) == {0.0}  # the price of opting in


def test_padding_with_the_sentinel_maps_to_id_zero_and_is_masked(
    stdlib_data: IndexedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer_module, "_warned_pad", set())
    with pytest.warns(AmbiguousPadTokenWarning):
        ds = make(stdlib_data, tmp_path, tokenizer=EodPaddedTokenizer())
    text = np.array([10, 11, 12, -1, -1], dtype=np.int64)

    item = ds.make_item(text)

    assert item["tokens"].tolist() == [10, 11, 12, 0]
    assert item["labels"].tolist() == [11, 12, 0, 0]
    assert item["loss_mask"].tolist() == [1, 1, 0, 0]
