"""Fill-in-the-middle on real source: length kept, PSM/SPM layouts, PSM undone restores the
document, fragments at a split token, and the same index always gives the same sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mcore.core.data import ByteTokenizer, FIMDataset, FIMTokens, GPTDataset, IndexedDataset
from mcore.core.data.fim import undo_psm

SEQ = 512


@pytest.fixture
def base(stdlib_data: IndexedDataset, tmp_path: Path) -> GPTDataset:
    return GPTDataset(
        stdlib_data,
        None,
        seq_length=SEQ,
        num_samples=64,
        tokenizer=ByteTokenizer(),
        seed=5,
        cache_dir=tmp_path,
    )


def documents(tokens: np.ndarray, eod: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(tokens == eod)
    pieces = np.split(tokens, cuts)
    return [pieces[0], *(p[1:] for p in pieces[1:])]


def test_fim_keeps_the_sample_length(base: GPTDataset) -> None:
    fim = FIMDataset(base, ByteTokenizer(), fim_rate=1.0, fim_spm_rate=0.5)

    for i in range(len(fim)):
        item = fim[i]
        assert len(fim.sample_tokens(i)) == SEQ + 1
        assert all(v.shape == (SEQ,) for v in item.values())


def test_psm_moved_back_restores_every_whole_document(base: GPTDataset) -> None:
    tok = ByteTokenizer()
    fim = FIMDataset(base, tok, fim_rate=1.0, fim_spm_rate=0.0)
    sentinels = FIMTokens.from_tokenizer(tok)
    restored = 0

    for i in range(len(fim)):
        original = documents(base.sample_tokens(i), tok.eod)
        rearranged = documents(fim.sample_tokens(i), tok.eod)
        # the sentinels push the end out: a document followed by EOD in the output is whole
        assert 1 <= len(rearranged) <= len(original)
        for before, after in zip(original, rearranged[:-1], strict=False):
            if len(before):
                assert after[0] == sentinels.prefix
                np.testing.assert_array_equal(undo_psm(after, sentinels), before)
                restored += 1
    assert restored >= 10


def test_spm_puts_the_suffix_first(base: GPTDataset) -> None:
    tok = ByteTokenizer()
    fim = FIMDataset(base, tok, fim_rate=1.0, fim_spm_rate=1.0)
    s = FIMTokens.from_tokenizer(tok)
    i = next(i for i in range(len(fim)) if tok.eod in base.sample_tokens(i)[: SEQ // 2])
    first = documents(fim.sample_tokens(i), tok.eod)[0]
    before = documents(base.sample_tokens(i), tok.eod)[0]

    assert first[:2].tolist() == [s.prefix, s.suffix]
    m = int(np.flatnonzero(first == s.middle)[0])
    suffix, prefix_middle = first[2:m], first[m + 1 :]
    np.testing.assert_array_equal(np.concatenate([prefix_middle, suffix]), before)


def test_rate_zero_changes_nothing_and_rates_mix(base: GPTDataset) -> None:
    tok = ByteTokenizer()
    plain = FIMDataset(base, tok, fim_rate=0.0)
    half = FIMDataset(base, tok, fim_rate=0.5)

    for i in range(8):
        np.testing.assert_array_equal(plain.sample_tokens(i), base.sample_tokens(i))
    changed = sum(
        not np.array_equal(half.sample_tokens(i), base.sample_tokens(i)) for i in range(len(half))
    )
    assert 0 < changed < len(half)


def test_same_index_same_sample_whatever_the_read_order(base: GPTDataset) -> None:
    fim = FIMDataset(base, ByteTokenizer(), fim_rate=0.9)
    forward = [fim.sample_tokens(i) for i in range(10)]
    backward = [fim.sample_tokens(i) for i in reversed(range(10))][::-1]

    for a, b in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = FIMDataset(base, ByteTokenizer(), fim_rate=0.9, seed=99)
    assert any(not np.array_equal(other_seed.sample_tokens(i), forward[i]) for i in range(10))


def test_split_token_cuts_fragments_and_keeps_them(base: GPTDataset) -> None:
    tok = ByteTokenizer()
    newline = ord("\n")
    fim = FIMDataset(
        base, tok, fim_rate=1.0, fim_spm_rate=0.0, split_token=newline, fragment_rate=1.0
    )
    s = FIMTokens.from_tokenizer(tok)

    out = fim.sample_tokens(0)
    before = base.sample_tokens(0)
    first_doc = documents(out, tok.eod)[0]
    lines = documents(first_doc, newline)

    assert len(out) == SEQ + 1
    assert sum(1 for line in lines if len(line) and line[0] == s.prefix) >= 3
    n = len(lines) - 1  # every fragment but the possibly truncated last one is whole
    restored = [undo_psm(line, s) if len(line) else line for line in lines[:n]]
    original = documents(documents(before, tok.eod)[0], newline)[:n]
    for got, want in zip(restored, original, strict=True):
        np.testing.assert_array_equal(got, want)


def test_tokenizer_without_sentinels_is_refused(base: GPTDataset) -> None:
    class Plain:
        vocab_size, eod, bos, pad = 259, 256, 257, 258

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode()

    with pytest.raises(Exception, match="fill-in-the-middle needs the tokens"):
        FIMDataset(base, Plain(), fim_rate=0.5)
