"""Fill-in-the-middle: samples rearranged so a left-to-right model learns to infill.

Per sample (Megatron-LM's ``GPTFIMDataset``, after Bavarian et al. 2022): the tokens are cut at
EOD into documents; each document, with probability ``fim_rate``, is decoded to text, cut at two
random character positions into prefix, middle and suffix, re-encoded, and laid out as

- PSM ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle``, or, with probability
  ``fim_spm_rate``,
- SPM ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle``.

With a ``split_token`` (say a file separator in repository-level data), a document holding it
is, with probability ``fim_rate``, cut into fragments at that token and each fragment is
transformed with probability ``fragment_rate``. The sample keeps its length: the sentinels make
it longer, so its end is cut off, or re-encoding made it shorter, so ``<fim_pad>`` fills the end
(padding is masked out of the loss).

Unlike Megatron, which draws from one random stream in the order items are read, each sample
draws from its own stream seeded by ``(seed, index)``: the same index gives the same sample
whatever the data-loader workers and read order. EOD and split tokens around empty documents
and fragments are kept (Megatron drops them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mcore.core.data.gpt import GPTDataset
from mcore.core.data.tokenizer import FIM_NAMES, Tokenizer
from mcore.core.errors import McoreError


@dataclass(frozen=True)
class FIMTokens:
    """Ids of the fill-in-the-middle sentinels."""

    prefix: int
    middle: int
    suffix: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> FIMTokens:
        """The tokenizer's ``<fim_prefix>``, ``<fim_middle>``, ``<fim_suffix>``, ``<fim_pad>``."""
        lookup = getattr(tokenizer, "token_to_id", None)
        ids = [lookup(name) if lookup is not None else None for name in FIM_NAMES]
        missing = [name for name, i in zip(FIM_NAMES, ids, strict=True) if i is None]
        if missing:
            raise McoreError(
                f"fill-in-the-middle needs the tokens {', '.join(FIM_NAMES)}; {tokenizer!r} lacks "
                f"{', '.join(missing)}. The byte tokenizer and tokenizers trained by "
                "`mcore data prepare --train-bpe` have them; or pass FIMTokens(...) yourself"
            )
        return cls(*ids)  # type: ignore[arg-type]


class FIMDataset(torch.utils.data.Dataset):
    """A :class:`GPTDataset` whose samples are fill-in-the-middle rearranged (see module doc)."""

    def __init__(
        self,
        base: GPTDataset,
        tokenizer: Tokenizer,
        *,
        fim_rate: float,
        fim_spm_rate: float = 0.5,
        tokens: FIMTokens | None = None,
        split_token: int | None = None,
        fragment_rate: float | None = None,
        no_prefix: str | None = None,
        seed: int | None = None,
    ) -> None:
        for name, rate in (("fim_rate", fim_rate), ("fim_spm_rate", fim_spm_rate)):
            if not 0.0 <= rate <= 1.0:
                raise McoreError(f"{name} must lie in [0, 1], got {rate}")
        self.base = base
        self.tokenizer = tokenizer
        self.fim_rate = fim_rate
        self.fim_spm_rate = fim_spm_rate
        self.tokens = tokens or FIMTokens.from_tokenizer(tokenizer)
        self.split_token = split_token
        self.fragment_rate = fim_rate if fragment_rate is None else fragment_rate
        self.no_prefix = no_prefix
        self.seed = base.seed if seed is None else seed
        self.eod = tokenizer.eod
        self.identifiers = {
            **base.identifiers,
            "class": "FIMDataset",
            "fim": [fim_rate, fim_spm_rate, self.fragment_rate, split_token, no_prefix, self.seed],
        }

    def __len__(self) -> int:
        return len(self.base)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The rearranged ``seq_length + 1`` token ids of sample ``idx``."""
        sample = self.base.sample_tokens(idx)
        rng = np.random.default_rng([self.seed, idx])
        out = self.transform(sample, rng)
        diff = len(out) - len(sample)
        if diff > 0:
            out = out[: len(sample)]
        elif diff < 0:
            out = np.concatenate([out, np.full(-diff, self.tokens.pad, dtype=np.int64)])
        return out

    def transform(self, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rearrange each EOD-separated document of ``sample`` (the length may change)."""
        pieces: list[np.ndarray] = []
        for i, doc in enumerate(_split_at(sample, self.eod)):
            if i:
                pieces.append(np.array([self.eod], dtype=np.int64))
            if len(doc):
                pieces.append(self._split_and_permute(doc, rng))
        return np.concatenate(pieces) if pieces else sample[:0]

    def _split_and_permute(self, doc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.split_token is None or not (doc == self.split_token).any():
            return self.permute(doc, self.fim_rate, rng)
        if rng.random() >= self.fim_rate:
            return doc
        pieces: list[np.ndarray] = []
        for i, fragment in enumerate(_split_at(doc, self.split_token)):
            if i:
                pieces.append(np.array([self.split_token], dtype=np.int64))
            if len(fragment):
                pieces.append(self.permute(fragment, self.fragment_rate, rng))
        return np.concatenate(pieces)

    def permute(self, doc: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
        """With probability ``rate``, ``doc`` in PSM or SPM order; else ``doc`` unchanged."""
        if rng.random() >= rate:
            return doc
        text = self.tokenizer.decode(doc.tolist())
        if self.no_prefix is not None and text.startswith(self.no_prefix):
            return doc
        lo, hi = sorted(int(b) for b in rng.integers(0, len(text) + 1, size=2))
        prefix, middle, suffix = (
            np.asarray(self.tokenizer.encode(part), dtype=np.int64)
            for part in (text[:lo], text[lo:hi], text[hi:])
        )
        t = self.tokens
        if rng.random() < self.fim_spm_rate:
            layout = [[t.prefix, t.suffix], suffix, [t.middle], prefix, middle]
        else:
            layout = [[t.prefix], prefix, [t.suffix], suffix, [t.middle], middle]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in layout])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.base.make_item(self.sample_tokens(idx), extra_pad_ids=(self.tokens.pad,))

    def __repr__(self) -> str:
        return f"FIMDataset({self.base!r}, fim_rate={self.fim_rate})"


def _split_at(tokens: np.ndarray, token: int) -> list[np.ndarray]:
    """``tokens`` cut at every ``token`` (which is dropped); n cuts give n + 1 pieces."""
    pieces = np.split(tokens, np.flatnonzero(tokens == token))
    return [pieces[0], *(piece[1:] for piece in pieces[1:])]


def undo_psm(tokens: np.ndarray, fim: FIMTokens) -> np.ndarray:
    """``prefix middle suffix`` from one PSM-ordered document (the inverse of PSM)."""
    tokens = np.asarray(tokens)
    if len(tokens) == 0 or tokens[0] != fim.prefix:
        raise ValueError("not a PSM document: it does not start with the prefix sentinel")
    s = int(np.flatnonzero(tokens == fim.suffix)[0])
    m = int(np.flatnonzero(tokens == fim.middle)[0])
    return np.concatenate([tokens[1:s], tokens[m + 1 :], tokens[s + 1 : m]])
