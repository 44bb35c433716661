"""The ``char`` tokenizer: one id per character of a small alphabet, then the special tokens.

Tiny models learning from scratch need a small vocabulary so that a random policy already hits
the right token now and then (a reward that is not hopelessly sparse). Select it with
``data.tokenizer = "char"``; the alphabet is ``rl.char_alphabet``. It satisfies mcore-core's
``Tokenizer`` protocol, so training, ``mcore serve`` and checkpoints use it like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mcore.core import McoreError
from megatron_rl.config import DEFAULT_ALPHABET


class CharTokenizer:
    """Characters of ``alphabet`` are ids ``0..len-1``; ``<eod>`` is the last id.

    ``<eod>`` is also BOS and PAD: a special token that decodes to nothing but does not stop a
    generation would let a policy shorten its visible answer without ending it (reward
    hacking a per-position reward), so there is no other. Text with a character outside the
    alphabet cannot be encoded: the error names it, since a silently dropped character would
    change what a reward function sees.
    """

    SPECIAL_TOKENS = ("<eod>",)

    def __init__(self, alphabet: str = DEFAULT_ALPHABET) -> None:
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise McoreError(
                f"the char tokenizer's alphabet must be non-empty with each character once, "
                f"got {alphabet!r} (rl.char_alphabet)"
            )
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}
        self.eod = self.bos = self.pad = len(alphabet)
        self.vocab_size = len(alphabet) + 1

    @property
    def fingerprint(self) -> str:
        return f"char:v2:{self.alphabet!r}"

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise McoreError(
                f"character {exc.args[0]!r} of {text[:60]!r} is not in the char tokenizer's "
                f"alphabet {self.alphabet!r} (rl.char_alphabet)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.alphabet)
        return "".join(self.alphabet[int(i)] for i in ids if 0 <= int(i) < n)

    def token_to_id(self, token: str) -> int | None:
        if token == "<eod>":
            return self.eod
        return self._ids.get(token)

    def __repr__(self) -> str:
        return f"CharTokenizer({self.alphabet!r})"


def build_char_tokenizer(config: Any = None) -> CharTokenizer:
    """Registry entry ``char``: the alphabet is ``rl.char_alphabet`` of the run config."""
    rl = getattr(config, "rl", None)
    return CharTokenizer(getattr(rl, "char_alphabet", DEFAULT_ALPHABET))
