"""Fixtures: real text (the running Python's standard library source) tokenized once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcore.core.data import ByteTokenizer, IndexedDataset, stdlib_sources
from mcore.core.data.prepare import write_documents

STDLIB_BYTES = 300_000
"""How much standard-library source the tests tokenize: enough for many documents, fast."""


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def stdlib_files() -> list[Path]:
    return stdlib_sources(max_bytes=STDLIB_BYTES)


@pytest.fixture(scope="session")
def stdlib_data(
    tmp_path_factory: pytest.TempPathFactory,
    stdlib_files: list[Path],
    byte_tokenizer: ByteTokenizer,
) -> IndexedDataset:
    """The capped standard library, one byte-tokenized document per file ending in EOD."""
    prefix = tmp_path_factory.mktemp("stdlib") / "stdlib"
    texts = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files)
    return write_documents(texts, byte_tokenizer, prefix, append_eod=True)
