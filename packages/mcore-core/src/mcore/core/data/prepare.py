"""Text and JSONL files to an indexed dataset: what ``mcore data prepare`` does.

A ``.jsonl`` (or ``.json``) file holds one document per line, the text under ``json_key`` (as
Megatron-LM's ``tools/preprocess_data.py`` reads it); any other file is one document. A folder
stands for its ``.py``, ``.txt``, ``.md`` and ``.jsonl`` files, sorted. Empty documents are
skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcore.core.data.indexed import IndexedDataset, IndexedDatasetBuilder, token_dtype
from mcore.core.data.tokenizer import HFTokenizer, Tokenizer, train_bpe
from mcore.core.errors import McoreError

FOLDER_SUFFIXES = (".py", ".txt", ".md", ".jsonl")
JSONL_SUFFIXES = (".jsonl", ".json")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files, folders expanded to their text files; raises for a missing path."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES
            )
            if not found:
                kinds = ", ".join(FOLDER_SUFFIXES)
                raise McoreError(f"folder {str(path)!r} holds no {kinds} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise McoreError(f"input {str(path)!r} does not exist")
    if not files:
        raise McoreError("no input files given")
    return files


def iter_documents(files: Iterable[Path], json_key: str = "text") -> Iterator[str]:
    """The text of every document in ``files``, in order."""
    for path in files:
        if path.suffix not in JSONL_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise McoreError(
                        f"{path}:{lineno}: not JSON ({exc.msg}); a {path.suffix} input holds one "
                        "JSON object per line"
                    ) from None
                if not isinstance(record, dict) or json_key not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise McoreError(
                        f"{path}:{lineno}: no key {json_key!r} (found {keys}); choose the text "
                        "field with --json-key"
                    )
                text = record[json_key]
                if not isinstance(text, str):
                    raise McoreError(f"{path}:{lineno}: {json_key!r} is not a string")
                if text:
                    yield text


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_documents(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    prefix: str | Path,
    *,
    append_eod: bool = False,
    dtype: Any = None,
    batch_size: int = 256,
) -> IndexedDataset:
    """Tokenize ``texts``, one document each, into ``prefix.bin``/``prefix.idx``.

    The dtype defaults to Megatron's choice for the vocabulary (uint16 below 65500 ids).
    """
    encode_batch = getattr(tokenizer, "encode_batch", None)
    builder = IndexedDatasetBuilder(prefix, dtype or token_dtype(tokenizer.vocab_size))
    with builder:
        for batch in _batches(texts, batch_size):
            encoded = encode_batch(batch) if encode_batch else [tokenizer.encode(t) for t in batch]
            for ids in encoded:
                if not ids:
                    continue
                builder.add_document([*ids, tokenizer.eod] if append_eod else ids)
        return builder.finalize()


@dataclass
class Prepared:
    """What :func:`prepare` made."""

    dataset: IndexedDataset
    tokenizer: Tokenizer
    tokenizer_path: Path | None
    num_files: int


def prepare(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    *,
    tokenizer: str | None = None,
    tokenizer_path: str | Path | None = None,
    train_bpe_vocab_size: int | None = None,
    json_key: str = "text",
    append_eod: bool = False,
) -> Prepared:
    """Tokenize ``inputs`` into ``output_prefix.bin``/``.idx``, training a BPE first if asked.

    ``tokenizer`` is a ``tokenizer`` registry name (default ``byte``, or ``hf`` when a
    ``tokenizer_path`` is given). With ``train_bpe_vocab_size`` a byte-level
    BPE is trained on the inputs and saved as ``output_prefix.tokenizer.json``.
    """
    from mcore.core.data.tokenizer import build_tokenizer
    from mcore.core.sections import DataConfig

    files = expand_inputs(inputs)
    saved: Path | None = None
    if train_bpe_vocab_size is not None:
        if tokenizer is not None or tokenizer_path is not None:
            raise McoreError(
                "--train-bpe trains a Hugging Face tokenizer and uses it; drop --tokenizer and "
                "--tokenizer-path"
            )
        saved = Path(f"{output_prefix}.tokenizer.json")
        tok: Tokenizer = train_bpe(iter_documents(files, json_key), train_bpe_vocab_size, saved)
    else:
        name = tokenizer or ("byte" if tokenizer_path is None else "hf")
        path = None if tokenizer_path is None else str(tokenizer_path)
        config = DataConfig(tokenizer=name, tokenizer_path=path)
        tok = build_tokenizer(config)
        if isinstance(tok, HFTokenizer):
            saved = tok.path
    dataset = write_documents(
        iter_documents(files, json_key), tok, output_prefix, append_eod=append_eod
    )
    return Prepared(dataset, tok, saved, len(files))
