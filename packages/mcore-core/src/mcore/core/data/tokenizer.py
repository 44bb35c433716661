"""Tokenizers: the small :class:`Tokenizer` protocol, a built-in byte tokenizer and HF files.

Registry entries of kind ``tokenizer`` are callables ``build(config) -> Tokenizer`` where
``config`` is the run :class:`~mcore.core.Config` or its ``data`` section; the two here are
``byte`` (:func:`build_byte_tokenizer`) and ``hf`` (:func:`build_hf_tokenizer`, reading
``data.tokenizer_path``). :func:`build_tokenizer` looks the configured one up.

Besides the protocol, both tokenizers have ``token_to_id(text) -> int | None`` (used to find the
fill-in-the-middle sentinels) and ``fingerprint`` (a string that changes whenever ids would, so
token caches can be keyed on it).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mcore.core.errors import McoreError

EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<eod>")
"""Special tokens taken as end-of-document, first found wins."""
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")
"""Special tokens taken as beginning-of-sequence; without one, BOS is the EOD token (GPT-2)."""
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
"""Special tokens taken as padding; without one (and no padding section), PAD is EOD."""
FIM_NAMES = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")
"""The fill-in-the-middle sentinels (StarCoder's names)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What datasets and the trainer need from a tokenizer."""

    vocab_size: int
    """Number of ids, special tokens included (every id is < vocab_size)."""
    eod: int
    """End-of-document id: appended after each document, so samples see where one ends."""
    bos: int
    """Beginning-of-sequence id."""
    pad: int
    """Padding id. It may equal ``eod`` (tokenizers without a pad token); datasets then warn and
    pad with a sentinel instead, see :func:`mcore.core.data.gpt.resolve_pad_id`."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without added special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        ...


class AmbiguousPadTokenWarning(UserWarning):
    """The tokenizer's PAD id equals its EOD or BOS id."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then special tokens; no files, no training.

    ``decode`` maps bytes that are not valid UTF-8 to lone surrogates (``surrogateescape``) and
    ``encode`` maps them back, so ``encode(decode(ids)) == ids`` for any byte ids: fill-in-the
    -middle cuts decoded text and re-encodes the pieces without losing a byte.
    """

    SPECIAL_TOKENS = ("<eod>", "<bos>", "<pad>", *FIM_NAMES)

    def __init__(self) -> None:
        self._special = {name: 256 + i for i, name in enumerate(self.SPECIAL_TOKENS)}
        self.eod = self._special["<eod>"]
        self.bos = self._special["<bos>"]
        self.pad = self._special["<pad>"]
        self.vocab_size = 256 + len(self.SPECIAL_TOKENS)

    @property
    def fingerprint(self) -> str:
        return f"byte:v1:{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogateescape"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="surrogateescape")

    def token_to_id(self, token: str) -> int | None:
        return self._special.get(token)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``), as Megatron's HF tokenizer.

    EOD, BOS and PAD come from the file's special tokens (:data:`EOD_NAMES`, :data:`BOS_NAMES`,
    :data:`PAD_NAMES`, or its padding section), unless named here. A file without a PAD token
    pads with EOD, as Hugging Face users do by habit; datasets warn about that (see
    :class:`AmbiguousPadTokenWarning`). Text is encoded without the file's post-processor
    template, so no BOS/EOS is added per call: documents get EOD where the data pipeline says.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        eod_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        if not self.path.is_file():
            raise McoreError(
                f"tokenizer file {str(self.path)!r} does not exist; pass the path of a Hugging "
                "Face tokenizer.json (data.tokenizer_path), or train one with "
                "`mcore data prepare ... --train-bpe VOCAB_SIZE`"
            )
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as exc:
            raise McoreError(f"cannot read tokenizer file {str(self.path)!r}: {exc}") from exc
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = {t.content: i for i, t in added.items() if t.special}
        self.vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1
        )
        eod = self._find(eod_token, EOD_NAMES)
        if eod is None:
            raise McoreError(
                f"tokenizer {str(self.path)!r} has no end-of-document token (looked for "
                f"{', '.join(EOD_NAMES)}; special tokens: {sorted(self._special_ids) or 'none'}); "
                "add one to the file or name it with eod_token="
            )
        self.eod = eod
        bos = self._find(bos_token, BOS_NAMES)
        self.bos = eod if bos is None else bos
        pad = self._find(pad_token, PAD_NAMES)
        if pad is None and pad_token is None and self._tok.padding is not None:
            pad = self._tok.padding.get("pad_id")
        self.pad = eod if pad is None else pad
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self._fingerprint = f"hf:{digest}:{self.eod}:{self.bos}:{self.pad}"

    def _find(self, explicit: str | None, names: Iterable[str]) -> int | None:
        if explicit is not None:
            found = self._tok.token_to_id(explicit)
            if found is None:
                raise McoreError(f"tokenizer {str(self.path)!r} has no token {explicit!r}")
            return found
        for name in names:
            if name in self._special_ids:
                return self._special_ids[name]
        return None

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel threads inside ``tokenizers``)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def train_bpe(
    texts: Iterable[str], vocab_size: int, path: str | Path, *, min_frequency: int = 2
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``texts``, save it as ``path`` and load it.

    Its special tokens are ``<|endoftext|>`` (EOD and BOS), ``<|pad|>`` and the FIM sentinels,
    ids 0 to 5, so fill-in-the-middle works and PAD never collides with EOD.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|pad|>", *FIM_NAMES]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise McoreError(
            f"--train-bpe vocabulary size must be at least {len(alphabet) + len(specials)} "
            f"(256 bytes and {len(specials)} special tokens), got {vocab_size}"
        )
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return HFTokenizer(path)


def fingerprint(tokenizer: Tokenizer) -> str:
    """A string identifying ``tokenizer``'s ids: its ``fingerprint`` or one made from probes."""
    own = getattr(tokenizer, "fingerprint", None)
    if isinstance(own, str):
        return own
    probe = "def f(x):\n    return x  # héllo, 世界\n"
    parts = [type(tokenizer).__qualname__, tokenizer.vocab_size, tokenizer.eod, tokenizer.bos]
    parts += [tokenizer.pad, tokenizer.encode(probe)]
    return "probe:" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def data_section(config: Any) -> Any:
    """The ``data`` section of a run config, or ``config`` itself when it is that section."""
    return getattr(config, "data", config)


def build_byte_tokenizer(config: Any = None) -> ByteTokenizer:
    """Registry entry ``byte``: the built-in :class:`ByteTokenizer` (``config`` is unused)."""
    return ByteTokenizer()


def build_hf_tokenizer(config: Any) -> HFTokenizer:
    """Registry entry ``hf``: :class:`HFTokenizer` of ``data.tokenizer_path``."""
    path = getattr(data_section(config), "tokenizer_path", None)
    if not path:
        raise McoreError(
            "data.tokenizer = 'hf' needs data.tokenizer_path, the path of a tokenizer.json "
            "(train one with `mcore data prepare INPUT --output-prefix P --train-bpe 8000`)"
        )
    return HFTokenizer(path)


def build_tokenizer(config: Any) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names, from the ``tokenizer`` registry."""
    from mcore.core.plugins import get_registry

    name = data_section(config).tokenizer
    return get_registry("tokenizer").get(name)(config)


_warned_pad: set[tuple[str, int]] = set()


def warn_ambiguous_pad_once(tokenizer: Tokenizer, message: str) -> None:
    """Issue :class:`AmbiguousPadTokenWarning` once per tokenizer and PAD id in this process."""
    key = (fingerprint(tokenizer), tokenizer.pad)
    if key in _warned_pad:
        return
    _warned_pad.add(key)
    warnings.warn(message, AmbiguousPadTokenWarning, stacklevel=3)
