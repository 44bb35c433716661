"""Megatron-LM's indexed dataset: token sequences in ``PREFIX.bin``, their index in ``PREFIX.idx``.

Files written by Megatron-LM's ``tools/preprocess_data.py`` read here unchanged, and files written
here read in Megatron-LM. The ``.idx`` layout, all little-endian:

======  ==========================  ====================================================
bytes   field                       value
======  ==========================  ====================================================
9       magic                       ``b"MMIDIDX\\x00\\x00"``
8       version                     uint64, 1
1       dtype code                  uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                    6 float64, 7 float32, 8 uint16
8       sequence count *S*          uint64
8       document count *D*          uint64: number of documents + 1
4·S     sequence lengths            int32, tokens per sequence
8·S     sequence pointers           int64, byte offset of each sequence in ``.bin``
8·D     document indices            int64, ``[0, ...]``: document *d* is sequences
                                    ``document_indices[d]:document_indices[d + 1]``
======  ==========================  ====================================================

Multimodal files add one int8 mode per sequence after that; it is ignored here. ``.bin`` is the
sequences' tokens back to back in the dtype. GPT data has one sequence per document; datasets
sample over sequences, as Megatron's ``GPTDataset`` does.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcore.core.errors import McoreError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
"""Megatron-LM's dtype codes (its ``DType`` enum)."""
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8


class DatasetFormatError(McoreError, ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated or not in Megatron's format."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """The dtype Megatron-LM picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dtype_code(dtype: Any) -> int:
    """Megatron's code of ``dtype``; raises for dtypes the format has no code for."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise DatasetFormatError(
            f"dtype {dtype!r} has no indexed-dataset code; use {names}"
        ) from None


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def write_index(
    path: str | Path,
    dtype: Any,
    sequence_lengths: Sequence[int] | np.ndarray,
    document_indices: Sequence[int] | np.ndarray,
) -> None:
    """Write a ``.idx`` file; sequence pointers follow from the lengths and the dtype size."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise DatasetFormatError("sequence lengths must lie in [0, 2**31)")
    docs = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(docs.astype("<i8").tobytes())


class IndexedDatasetBuilder:
    """Write ``PREFIX.bin`` and ``PREFIX.idx``; the pair appears only on :meth:`finalize`.

    ``add_document(tokens)`` adds a one-sequence document (GPT data); ``add_item`` then
    ``end_document`` builds a document of several sequences, as in Megatron. Use it as a
    context manager: leaving on an exception removes the partial files.
    """

    def __init__(self, prefix: str | Path, dtype: Any = np.int32) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._range: tuple[float, float] | None = (info.min, info.max)
        else:
            self._range = None
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = Path(f"{bin_path(self.prefix)}{tag}")
        self._idx_tmp = Path(f"{idx_path(self.prefix)}{tag}")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self.num_tokens = 0

    def add_item(self, tokens: Any) -> None:
        """Append one sequence to the current document."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if self._range is not None and arr.size:
            lo, hi = arr.min(), arr.max()
            if lo < self._range[0] or hi > self._range[1]:
                raise DatasetFormatError(
                    f"token ids {lo}..{hi} do not fit the dataset dtype {self.dtype.name}; "
                    "use a wider dtype (int32 for vocabularies of 65500 ids or more)"
                )
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.sequence_lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def end_document(self) -> None:
        """Close the current document (after its :meth:`add_item` calls)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Any) -> None:
        """Add a document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, prefix: str | Path) -> None:
        """Append every document of another indexed dataset of the same dtype."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DatasetFormatError(
                f"cannot append {prefix} ({other.dtype.name}) to a {self.dtype.name} dataset"
            )
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(n) for n in other.sequence_lengths)
        self.document_indices.extend(int(d) + offset for d in other.document_indices[1:])
        self.num_tokens += int(other.sequence_lengths.sum())
        self._bin.flush()
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def finalize(self) -> IndexedDataset:
        """Write the index, publish both files under the prefix and open the result."""
        if self.document_indices[-1] != len(self.sequence_lengths):
            self.end_document()  # items added without end_document form a last document
        self._bin.close()
        write_index(self._idx_tmp, self.dtype, self.sequence_lengths, self.document_indices)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        return IndexedDataset(self.prefix)

    def abort(self) -> None:
        """Drop the partial files."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._bin.closed:
            self.finalize()


class IndexedDataset:
    """A ``.bin``/``.idx`` pair, memory-mapped: ``ds[i]`` is sequence ``i`` as a numpy array.

    Arrays returned are read-only views of the mapped file. The dataset pickles by prefix (a
    data-loader worker maps the files again rather than copying them).
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self._open()

    def _open(self) -> None:
        idx, bin_ = idx_path(self.prefix), bin_path(self.prefix)
        for path in (idx, bin_):
            if not path.is_file():
                raise DatasetFormatError(
                    f"{path} does not exist: an indexed dataset is a PREFIX.bin and PREFIX.idx "
                    f"pair (prefix {str(self.prefix)!r}); make one with `mcore data prepare`"
                )
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise DatasetFormatError(
                f"{idx} is not a Megatron indexed-dataset index: it starts with {head[:9]!r}, "
                f"expected {INDEX_HEADER!r}"
            )
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != INDEX_VERSION:
            raise DatasetFormatError(f"{idx}: index version {version}, only 1 is supported")
        (code,) = struct.unpack_from("<B", head, 17)
        if code not in DTYPE_CODES:
            known = sorted(DTYPE_CODES)
            raise DatasetFormatError(f"{idx}: unknown dtype code {code}, known {known}")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        seq_count, doc_count = struct.unpack_from("<QQ", head, 18)
        need = _HEADER_BYTES + 12 * seq_count + 8 * doc_count
        if idx_size < need:
            raise DatasetFormatError(
                f"{idx} is truncated: {idx_size} bytes, its header needs {need} "
                f"({seq_count} sequences, {doc_count} document indices)"
            )
        self._idx_map = np.memmap(idx, dtype=np.uint8, mode="r")
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._idx_map, "<i4", seq_count, off)
        off += 4 * seq_count
        self.sequence_pointers = np.frombuffer(self._idx_map, "<i8", seq_count, off)
        off += 8 * seq_count
        self.document_indices = np.frombuffer(self._idx_map, "<i8", doc_count, off)
        if doc_count == 0 or self.document_indices[0] != 0:
            raise DatasetFormatError(f"{idx}: document indices must start at 0")
        if self.document_indices[-1] != seq_count:
            raise DatasetFormatError(
                f"{idx}: the last document index is {self.document_indices[-1]}, expected the "
                f"sequence count {seq_count}"
            )
        bin_size = bin_.stat().st_size
        itemsize = self.dtype.itemsize
        if seq_count:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
            if end > bin_size:
                raise DatasetFormatError(
                    f"{bin_} is truncated: {bin_size} bytes, the index needs {end}"
                )
        if bin_size >= itemsize:
            self._bin_map = np.memmap(bin_, dtype=self.dtype, mode="r")
        else:  # numpy cannot map an empty file
            self._bin_map = np.empty(0, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end by default)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens {offset}:{offset + length} are outside sequence {idx} of {size} tokens"
            )
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        return self._bin_map[start : start + length]

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous")
            return [self.get(i) for i in range(start, stop)]
        return self.get(int(idx))

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences joined)."""
        beg, end = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if end - beg == 1:
            return self.get(beg)
        return np.concatenate([self.get(i) for i in range(beg, end)]).astype(self.dtype)

    @staticmethod
    def exists(prefix: str | Path) -> bool:
        return idx_path(prefix).is_file() and bin_path(prefix).is_file()

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}, dtype={self.dtype.name}, "
            f"sequences={len(self)}, documents={self.num_documents})"
        )
