"""Tokenizers: the built-in byte tokenizer, Hugging Face tokenizer.json files, and the
registry entries that build them from the data config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcore.core import McoreError, get_registry
from mcore.core.data import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, train_bpe
from mcore.core.sections import DataConfig


def test_byte_tokenizer_round_trips_text_and_any_bytes() -> None:
    tok = ByteTokenizer()
    text = "def héllo():\n    return '世界'\n"

    ids = tok.encode(text)

    assert isinstance(tok, Tokenizer)
    assert ids == list(text.encode())
    assert tok.decode([tok.bos, *ids, tok.eod, tok.pad]) == text  # specials are skipped
    assert len({tok.eod, tok.bos, tok.pad}) == 3 and min(tok.eod, tok.bos, tok.pad) >= 256
    assert tok.vocab_size == 256 + len(ByteTokenizer.SPECIAL_TOKENS)
    broken = [0xE4, 0xB8, 0x41, 0xFF]  # a cut multi-byte character and an invalid byte
    assert tok.encode(tok.decode(broken)) == broken


def test_trained_bpe_has_distinct_special_tokens(tmp_path: Path, stdlib_files: list[Path]) -> None:
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files[:6]]

    tok = train_bpe(texts, 400, tmp_path / "tok.json")

    assert (tmp_path / "tok.json").is_file()
    assert tok.vocab_size == 400
    assert tok.eod == tok.token_to_id("<|endoftext|>") == tok.bos
    assert tok.pad == tok.token_to_id("<|pad|>") != tok.eod
    assert tok.token_to_id("<fim_middle>") is not None
    ids = tok.encode(texts[0])
    assert len(ids) < len(texts[0].encode()) / 1.5  # merges learned from the source
    assert tok.decode(ids) == texts[0]


def test_hf_file_without_pad_pads_with_eod(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])  # GPT-2's only special token
    hf.save(str(tmp_path / "gpt2ish.json"))

    tok = HFTokenizer(tmp_path / "gpt2ish.json")

    assert tok.eod == tok.bos == tok.pad == 2
    assert tok.vocab_size == 3


def test_registry_builds_the_configured_tokenizer(tmp_path: Path, stdlib_files: list[Path]) -> None:
    train_bpe([p.read_text(encoding="utf-8") for p in stdlib_files[:3]], 300, tmp_path / "t.json")

    byte = build_tokenizer(DataConfig())
    hf = build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "t.json")))

    assert isinstance(byte, ByteTokenizer) and isinstance(hf, HFTokenizer)
    assert {"byte", "hf"} <= set(get_registry("tokenizer").names())
    with pytest.raises(McoreError, match="needs data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="hf"))
    with pytest.raises(McoreError, match="does not exist"):
        build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "no.json")))
