"""Megatron-LM's .bin/.idx format: files packed by hand from its published layout read back
identically, our writer produces those same bytes, and damaged files fail clearly."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from mcore.core.data import (
    ByteTokenizer,
    DatasetFormatError,
    IndexedDataset,
    IndexedDatasetBuilder,
)


def pack_megatron_pair(prefix: Path, documents: list[list[list[int]]], code: int, fmt: str) -> None:
    """Write PREFIX.bin/.idx with struct alone, field by field as Megatron-LM's _IndexWriter.

    ``documents`` is a list of documents, each a list of sequences of token ids; ``code`` and
    ``fmt`` are the dtype's Megatron code and struct letter (8 and "H" for uint16).
    """
    itemsize = struct.calcsize(fmt)
    sequences = [seq for doc in documents for seq in doc]
    lengths = [len(s) for s in sequences]
    pointers, offset = [], 0
    for n in lengths:
        pointers.append(offset)
        offset += n * itemsize
    doc_indices = [0]
    for doc in documents:
        doc_indices.append(doc_indices[-1] + len(doc))
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(struct.pack(f"<{len(seq)}{fmt}", *seq))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))  # version
        f.write(struct.pack("<B", code))  # dtype code
        f.write(struct.pack("<Q", len(sequences)))  # sequence count
        f.write(struct.pack("<Q", len(doc_indices)))  # document count (+1)
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))  # int32 lengths
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))  # int64 byte offsets
        f.write(struct.pack(f"<{len(doc_indices)}q", *doc_indices))  # int64 document indices


def stdlib_documents(files: list[Path], tokenizer: ByteTokenizer) -> list[list[list[int]]]:
    """Real text: each file one document; every third file as two sequences (two 'sentences')."""
    docs = []
    for i, path in enumerate(files[:12]):
        ids = tokenizer.encode(path.read_text(encoding="utf-8"))
        docs.append([ids[: len(ids) // 2], ids[len(ids) // 2 :]] if i % 3 == 0 else [ids])
    return docs


@pytest.mark.parametrize(("code", "fmt", "dtype"), [(8, "H", np.uint16), (4, "i", np.int32)])
def test_reads_a_hand_packed_megatron_pair(
    tmp_path: Path, stdlib_files: list[Path], byte_tokenizer: ByteTokenizer, code, fmt, dtype
) -> None:
    documents = stdlib_documents(stdlib_files, byte_tokenizer)
    pack_megatron_pair(tmp_path / "megatron", documents, code, fmt)

    ds = IndexedDataset(tmp_path / "megatron")

    sequences = [seq for doc in documents for seq in doc]
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(sequences)
    assert ds.num_documents == len(documents)
    for i, seq in enumerate(sequences):
        assert ds[i].tolist() == seq
    for d, doc in enumerate(documents):
        assert ds.document(d).tolist() == [t for seq in doc for t in seq]
    assert ds.get(1, offset=5, length=7).tolist() == sequences[1][5:12]
    text = byte_tokenizer.decode(ds.document(1).tolist())
    assert text == stdlib_files[1].read_text(encoding="utf-8")


def test_builder_writes_the_same_bytes_as_megatron_layout(
    tmp_path: Path, stdlib_files: list[Path], byte_tokenizer: ByteTokenizer
) -> None:
    documents = stdlib_documents(stdlib_files, byte_tokenizer)
    pack_megatron_pair(tmp_path / "megatron", documents, 8, "H")

    with IndexedDatasetBuilder(tmp_path / "ours", np.uint16) as builder:
        for doc in documents:
            for seq in doc:
                builder.add_item(seq)
            builder.end_document()

    for ext in ("bin", "idx"):
        ours, megatron = tmp_path / f"ours.{ext}", tmp_path / f"megatron.{ext}"
        assert ours.read_bytes() == megatron.read_bytes()


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.float32, np.float64]
)
def test_builder_round_trips_every_dtype(tmp_path: Path, dtype) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 0, 17, 1)]
    with IndexedDatasetBuilder(tmp_path / "d", dtype) as builder:
        for doc in docs:
            builder.add_document(doc)

    ds = IndexedDataset(tmp_path / "d")

    assert ds.dtype == np.dtype(dtype) and len(ds) == 4 and ds.num_documents == 4
    for got, want in zip(ds[0:4], docs, strict=True):
        np.testing.assert_array_equal(got, want)
    assert ds.num_tokens == 23


def test_add_index_concatenates_datasets(tmp_path: Path) -> None:
    for name, docs in (("a", [[1, 2], [3]]), ("b", [[4, 5, 6]])):
        with IndexedDatasetBuilder(tmp_path / name, np.uint16) as builder:
            for doc in docs:
                builder.add_document(doc)
    with IndexedDatasetBuilder(tmp_path / "ab", np.uint16) as builder:
        builder.add_index(tmp_path / "a")
        builder.add_index(tmp_path / "b")

    ds = IndexedDataset(tmp_path / "ab")

    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3]


def test_dataset_pickles_by_prefix_for_loader_workers(stdlib_data: IndexedDataset) -> None:
    data = pickle.dumps(stdlib_data)

    assert len(data) < 1000  # the files are mapped again, not copied
    clone = pickle.loads(data)
    np.testing.assert_array_equal(clone[3], stdlib_data[3])


def test_token_ids_that_overflow_the_dtype_are_refused(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(tmp_path / "d", np.uint16)
    with pytest.raises(DatasetFormatError, match="do not fit the dataset dtype uint16"):
        builder.add_document([1, 70000])
    builder.abort()
    assert not list(tmp_path.iterdir())


def test_a_failed_build_leaves_no_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "d") as builder:
        builder.add_document([1, 2, 3])
        raise RuntimeError("tokenizer crashed")
    assert not list(tmp_path.iterdir())


def test_damaged_files_fail_with_the_reason(tmp_path: Path) -> None:
    with IndexedDatasetBuilder(tmp_path / "d", np.int32) as builder:
        builder.add_document([1, 2, 3])
    idx = (tmp_path / "d.idx").read_bytes()

    with pytest.raises(DatasetFormatError, match="does not exist"):
        IndexedDataset(tmp_path / "missing")
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX!" + idx[9:])
    with pytest.raises(DatasetFormatError, match="not a Megatron indexed-dataset index"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(idx[:-8])
    with pytest.raises(DatasetFormatError, match="truncated"):
        IndexedDataset(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(idx)
    (tmp_path / "d.bin").write_bytes(b"\0" * 4)
    with pytest.raises(DatasetFormatError, match=r"d\.bin is truncated"):
        IndexedDataset(tmp_path / "d")
