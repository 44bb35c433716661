"""``GPTDataset``: fixed-length samples drawn across document boundaries, as Megatron-LM's.

Three indices, built with numpy and cached on disk (see :mod:`mcore.core.data.cache`):

- document index: the split's documents, once per epoch, shuffled (epochs as many as the
  requested number of samples needs; a short last epoch is shuffled on its own, as Megatron does
  when it holds under 80% of an epoch's samples, so early samples do not repeat documents);
- sample index: row *i* is ``(position in the document index, token offset)`` where sample *i*
  starts; sample *i* is the ``seq_length + 1`` tokens from row *i* to row *i + 1* inclusive, so
  consecutive samples share one token, and every token is a label exactly once;
- shuffle index: a permutation of the samples.

For equal inputs and seed the three arrays equal Megatron-LM's (same ``RandomState`` calls, same
sample boundaries as its C++ ``build_sample_idx``), so a Megatron user's data order carries over.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcore.core.data.cache import cached_arrays
from mcore.core.data.indexed import IndexedDataset
from mcore.core.data.tokenizer import Tokenizer, warn_ambiguous_pad_once
from mcore.core.errors import McoreError

SPLITS = ("train", "valid", "test")
PAD_SENTINEL = -1
"""What samples are padded with when the tokenizer's PAD is ambiguous: never a real token."""
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> ``[0.969, 0.03, 0.001]``: up to three weights, normalised, padded."""
    try:
        weights = [float(w) for w in re.findall(r"[^,/\s]+", split)]
    except ValueError:
        weights = []
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise McoreError(
            f"data.split must be up to 3 non-negative numbers like '969,30,1', got {split!r}"
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """Document ranges ``[beg, end)`` of train, valid and test; ``None`` for a zero weight.

    Bounds are ``round(cumulative fraction * num_documents)``, as in Megatron, so the ranges are
    contiguous, disjoint and cover every document.
    """
    bounds = np.concatenate([[0.0], np.cumsum(parse_split(split))])
    out: list[tuple[int, int] | None] = []
    for lo, hi in itertools.pairwise(bounds.tolist()):
        if hi <= lo:
            out.append(None)
        else:
            out.append((round(lo * num_documents), round(hi * num_documents)))
    return out


def resolve_pad_id(tokenizer: Tokenizer, allow_ambiguous_pad_tokens: bool = False) -> int:
    """The id datasets pad with and mask out of the loss.

    When a tokenizer's PAD equals its EOD or BOS (many Hugging Face tokenizers pad with EOS),
    masking "pad" labels would also mask every real end-of-document, so the model never learns
    where documents end. Unless ``allow_ambiguous_pad_tokens``, samples are then padded with
    :data:`PAD_SENTINEL` instead (mapped to id 0 in the returned tensors, loss-masked), and a
    warning says so once. With it, the tokenizer's PAD is used as is: real EOD/BOS labels get
    loss mask 0 too. This is Megatron-LM's ``allow_ambiguous_pad_tokens``.
    """
    pad = tokenizer.pad
    clashes = [name for name in ("eod", "bos") if getattr(tokenizer, name) == pad]
    if not clashes or allow_ambiguous_pad_tokens:
        return pad
    warn_ambiguous_pad_once(
        tokenizer,
        f"the tokenizer's PAD id {pad} is also its {' and '.join(clashes).upper()} id; padding "
        f"with {PAD_SENTINEL} instead so that real {clashes[0].upper()} tokens stay in the loss "
        "(set allow_ambiguous_pad_tokens to pad with the tokenizer's id and mask them as well)",
    )
    return PAD_SENTINEL


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times and shuffled (int32)."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate([first, last])


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """Rows ``(position in document_index, offset)`` where each of ``num_samples`` samples starts.

    Sample *i* covers global token positions ``i * seq_length`` to ``(i + 1) * seq_length``
    inclusive of the documents laid out in ``document_index`` order; a boundary is the document
    holding that position (empty documents are skipped), so a sample ending exactly at a
    document's end starts the next sample on that document's last token, as Megatron's does.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)[document_index]
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and positions[-1] >= starts[-1]:
        raise ValueError("the document index holds fewer tokens than the samples need")
    doc = np.searchsorted(starts, positions, side="right") - 1
    offset = positions - starts[doc]
    doc[0], offset[0] = 0, 0  # Megatron starts at the first document even if it is empty
    big = max(len(document_index), int(lengths.max(initial=0)))
    dtype = np.int32 if big <= np.iinfo(np.int32).max else np.int64
    return np.stack([doc, offset], axis=1).astype(dtype)


def build_shuffle_index(
    num_samples: int, total_size: int, rng: np.random.RandomState
) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` then, separately, of ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    documents: np.ndarray,
    seq_length: int,
    num_samples: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """Document, sample and shuffle indices for ``num_samples`` samples (one epoch if None)."""
    tokens_per_epoch = int(np.asarray(sequence_lengths)[documents].sum(dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise McoreError(
            f"the documents of this split hold {tokens_per_epoch} tokens; a sample needs "
            f"{seq_length + 1}: use more data or give this split a larger share (data.split)"
        )
    num_epochs = 1
    if num_samples is not None:
        needed = num_samples * seq_length + 1
        num_epochs = max(1, -(-needed // tokens_per_epoch))
    separate_final_epoch, before_final = False, 0
    if num_epochs > 1:
        assert num_samples is not None
        before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        from_final = num_samples - before_final
        separate_final_epoch = from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length, total)
    if separate_final_epoch:
        shuffle_index = build_shuffle_index(before_final, total, rng)
    else:
        shuffle_index = build_shuffle_index(total, total, rng)
    return {
        "document_index": document_index,
        "sample_index": sample_index,
        "shuffle_index": shuffle_index,
    }


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens from ``documents`` of an :class:`IndexedDataset`.

    ``ds[i]`` is ``{"tokens", "labels", "loss_mask", "position_ids"}``, each of length
    ``seq_length`` (labels are tokens shifted by one). ``len(ds)`` is at least ``num_samples``
    (all of the last epoch's samples are kept). Indices are cached in ``cache_dir``, by default
    ``PREFIX/cache/GPTDataset_indices`` beside the data as in Megatron; ``from_cache`` says
    whether this instance loaded them.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: Sequence[int] | np.ndarray | None,
        *,
        seq_length: int,
        num_samples: int | None,
        tokenizer: Tokenizer,
        seed: int = 1234,
        split: str = "train",
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        allow_ambiguous_pad_tokens: bool = False,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
    ) -> None:
        if seq_length < 1:
            raise McoreError(f"seq_length must be >= 1, got {seq_length}")
        self.indexed = indexed
        if documents is None:
            documents = np.arange(len(indexed), dtype=np.int32)
        self.documents = np.asarray(documents, dtype=np.int32)
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        self.split = split
        self.eod = tokenizer.eod
        self.pad_id = resolve_pad_id(tokenizer, allow_ambiguous_pad_tokens)
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids
        if cache_dir is None:
            cache_dir = Path(str(indexed.prefix)) / "cache" / "GPTDataset_indices"
        idx_stat = Path(f"{indexed.prefix}.idx").stat()
        self.identifiers = {
            "class": "GPTDataset",
            "dataset_path": str(Path(indexed.prefix).resolve()),
            "idx_bytes": idx_stat.st_size,
            "idx_mtime_ns": idx_stat.st_mtime_ns,
            "documents": _digest(self.documents),
            "num_samples": num_samples,
            "index_split": split,
            "random_seed": seed,
            "sequence_length": seq_length,
            "add_extra_token_to_sequence": True,
        }
        arrays, self.from_cache = cached_arrays(
            Path(cache_dir) if use_cache else None,
            f"GPTDataset-{split}",
            self.identifiers,
            ("document_index", "sample_index", "shuffle_index"),
            lambda: build_gpt_indices(
                indexed.sequence_lengths, self.documents, seq_length, num_samples, seed
            ),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` token ids of sample ``idx`` (int64)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} is outside this dataset of {len(self)} samples")
        i = int(self.shuffle_index[idx])
        doc_beg, off_beg = (int(v) for v in self.sample_index[i])
        doc_end, off_end = (int(v) for v in self.sample_index[i + 1])
        if doc_beg == doc_end:
            doc = int(self.document_index[doc_beg])
            return self.indexed.get(doc, off_beg, off_end - off_beg + 1).astype(np.int64)
        parts = []
        for j in range(doc_beg, doc_end + 1):
            doc = int(self.document_index[j])
            offset = off_beg if j == doc_beg else 0
            length = off_end + 1 if j == doc_end else None
            parts.append(self.indexed.get(doc, offset, length))
        return np.concatenate(parts).astype(np.int64)

    def make_item(self, text: np.ndarray, extra_pad_ids: Sequence[int] = ()) -> dict[str, Any]:
        """Tokens, labels, loss mask and positions from ``seq_length + 1`` token ids."""
        text_t = torch.from_numpy(np.ascontiguousarray(text, dtype=np.int64))
        tokens = text_t[:-1].clone()
        labels = text_t[1:].clone()
        loss_mask = torch.ones(len(tokens), dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        for pad in (self.pad_id, *extra_pad_ids):
            loss_mask[labels == pad] = 0.0
        position_ids = torch.arange(len(tokens), dtype=torch.long)
        if self.reset_position_ids:
            position_ids = _reset_positions(tokens, self.eod)
        # the pad sentinel is no valid id: map it to 0 for the embedding (its loss is masked)
        tokens[tokens == PAD_SENTINEL] = 0
        labels[labels == PAD_SENTINEL] = 0
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
        }

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.make_item(self.sample_tokens(idx))

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.split}, {len(self)} samples of {self.seq_length} tokens, "
            f"{len(self.documents)} documents of {self.indexed.prefix})"
        )


def _reset_positions(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Positions restarting at 0 after every EOD (Megatron's ``reset_position_ids``)."""
    n = len(tokens)
    idx = torch.arange(n)
    after_eod = torch.zeros(n, dtype=torch.long)
    after_eod[1:] = (tokens[:-1] == eod).long()
    starts = torch.where(after_eod.bool(), idx, torch.zeros_like(idx))
    return idx - torch.cummax(starts, dim=0).values


def _digest(arr: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(arr).tobytes(), usedforsecurity=False).hexdigest()
