"""The ``dataset`` registry entries: ``python_stdlib`` (the default) and ``indexed``.

An entry is a callable ``build(config, tokenizer, *, num_samples) -> (train, valid, test)``:

- ``config``: the run :class:`~mcore.core.Config` (its ``data`` section is read, and
  ``train.seed`` when present) or a :class:`~mcore.core.sections.DataConfig` alone;
- ``tokenizer``: a :class:`~mcore.core.data.tokenizer.Tokenizer`, usually
  ``build_tokenizer(config)``;
- ``num_samples``: ``{"train": n, "valid": n, "test": n}``; a missing or ``None`` count means
  one epoch of that split, ``0`` means the split is not built;
- returns map-style torch datasets of ``{"tokens", "labels", "loss_mask", "position_ids"}``
  (``seq_length`` each), ``None`` for a split that is not built or has no documents.

Optional ``data`` fields read when present (with these defaults): ``allow_ambiguous_pad_tokens``
(False), ``eod_mask_loss`` (False), ``reset_position_ids`` (False), ``fim_rate`` (0.0),
``fim_spm_rate`` (0.5), ``fim_split_token`` (None, a token string), ``fim_fragment_rate``
(None: ``fim_rate``), ``fim_no_prefix`` (None), ``max_bytes`` (None: the whole standard library).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcore.core.data.blended import BlendedDataset, normalize, parse_data_path
from mcore.core.data.cache import default_cache_root, file_lock
from mcore.core.data.fim import FIMDataset
from mcore.core.data.gpt import SPLITS, GPTDataset, split_ranges
from mcore.core.data.indexed import IndexedDataset
from mcore.core.data.prepare import write_documents
from mcore.core.data.tokenizer import Tokenizer, data_section, fingerprint
from mcore.core.errors import McoreError
from mcore.core.sections import TrainConfig

SKIPPED_FOLDERS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
BLEND_SURPLUS = 0.005
"""Extra samples each blended part is built with, as Megatron's mid_level_dataset_surplus."""

Splits = tuple[Any, Any, Any]


def stdlib_sources(root: str | Path | None = None, *, max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted, without test folders and site-packages.

    ``max_bytes`` keeps files in order while their total stays within it (larger ones are
    skipped), for quick runs and tests.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                files.append((path.relative_to(root).as_posix(), path))
    files.sort()
    if max_bytes is None:
        return [p for _, p in files]
    kept, total = [], 0
    for _, path in files:
        size = path.stat().st_size
        if total + size <= max_bytes:
            kept.append(path)
            total += size
    return kept


def stdlib_dataset(
    tokenizer: Tokenizer, cache_root: str | Path, *, max_bytes: int | None = None
) -> IndexedDataset:
    """The standard library tokenized into an indexed dataset under ``cache_root``, built once.

    One document per file, each ending in EOD. The prefix is keyed by the interpreter, the
    files, the tokenizer and ``max_bytes``, so a change to any of them builds a new one.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(root, max_bytes=max_bytes)
    if not files:
        raise McoreError(f"found no .py files under the standard library {root}")
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
    key = json.dumps([sys.version, str(root), listing, fingerprint(tokenizer), max_bytes, "eod", 1])
    digest = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:16]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    prefix = Path(cache_root) / f"python_stdlib-{version}-{digest}"
    if IndexedDataset.exists(prefix):
        return IndexedDataset(prefix)
    with file_lock(Path(cache_root) / f".{prefix.name}.lock"):
        if IndexedDataset.exists(prefix):
            return IndexedDataset(prefix)
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in files)
        return write_documents(texts, tokenizer, prefix, append_eod=True)


@dataclass(frozen=True, kw_only=True)
class GPTDataOptions:
    """How GPT datasets are cut and sampled; :meth:`from_config` reads them from ``data``."""

    seq_length: int
    """Tokens per sample (each sample reads one more, for the labels)."""
    split: str = "969,30,1"
    """Train, valid and test shares of the documents."""
    seed: int = 1234
    """Seed of the document and sample shuffles."""
    cache_dir: str | Path | None = None
    """Where index caches go; None puts them beside each dataset, as Megatron does."""
    allow_ambiguous_pad_tokens: bool = False
    """Pad with the tokenizer's PAD even when it equals EOD/BOS (see ``resolve_pad_id``)."""
    eod_mask_loss: bool = False
    """Give EOD tokens loss mask 0."""
    reset_position_ids: bool = False
    """Restart position ids after every EOD."""
    fim_rate: float = 0.0
    """Probability of fill-in-the-middle per document; 0 disables FIM."""
    fim_spm_rate: float = 0.5
    """Probability that a FIM document uses SPM rather than PSM order."""
    fim_split_token: int | None = None
    """Token id at which FIM cuts documents into fragments."""
    fim_fragment_rate: float | None = None
    """Probability of FIM per fragment; None means fim_rate."""
    fim_no_prefix: str | None = None
    """Documents whose text starts with this are left as they are."""

    @classmethod
    def from_config(cls, config: Any, tokenizer: Tokenizer) -> GPTDataOptions:
        data = data_section(config)
        train = getattr(config, "train", None)
        split_token = getattr(data, "fim_split_token", None)
        if split_token is not None:
            found = getattr(tokenizer, "token_to_id", lambda _: None)(split_token)
            ids = [found] if found is not None else tokenizer.encode(split_token)
            if len(ids) != 1:
                raise McoreError(
                    f"data.fim_split_token {split_token!r} is {len(ids)} tokens; it must be one"
                )
            split_token = ids[0]
        return cls(
            # train.seq_length in a run config; a bare DataConfig gets the run default.
            seq_length=getattr(train, "seq_length", None) or TrainConfig().seq_length,
            split=data.split,
            seed=getattr(train, "seed", getattr(data, "seed", 1234)),
            cache_dir=data.cache_dir,
            allow_ambiguous_pad_tokens=getattr(data, "allow_ambiguous_pad_tokens", False),
            eod_mask_loss=getattr(data, "eod_mask_loss", False),
            reset_position_ids=getattr(data, "reset_position_ids", False),
            fim_rate=getattr(data, "fim_rate", 0.0),
            fim_spm_rate=getattr(data, "fim_spm_rate", 0.5),
            fim_split_token=split_token,
            fim_fragment_rate=getattr(data, "fim_fragment_rate", None),
            fim_no_prefix=getattr(data, "fim_no_prefix", None),
        )


def split_datasets(
    indexed: IndexedDataset,
    tokenizer: Tokenizer,
    options: GPTDataOptions,
    sizes: Sequence[int | None],
) -> list[Any]:
    """GPTDatasets (FIM-wrapped if asked) of the train, valid and test document ranges."""
    out: list[Any] = []
    ranges = split_ranges(options.split, len(indexed))
    for name, bounds, size in zip(SPLITS, ranges, sizes, strict=True):
        if bounds is None or bounds[0] == bounds[1] or size == 0:
            out.append(None)
            continue
        ds: Any = GPTDataset(
            indexed,
            np.arange(*bounds, dtype=np.int32),
            seq_length=options.seq_length,
            num_samples=size,
            tokenizer=tokenizer,
            seed=options.seed,
            split=name,
            cache_dir=options.cache_dir,
            allow_ambiguous_pad_tokens=options.allow_ambiguous_pad_tokens,
            eod_mask_loss=options.eod_mask_loss,
            reset_position_ids=options.reset_position_ids,
        )
        if options.fim_rate > 0:
            ds = FIMDataset(
                ds,
                tokenizer,
                fim_rate=options.fim_rate,
                fim_spm_rate=options.fim_spm_rate,
                split_token=options.fim_split_token,
                fragment_rate=options.fim_fragment_rate,
                no_prefix=options.fim_no_prefix,
            )
        out.append(ds)
    if out[0] is None and sizes[0] != 0:
        raise McoreError(
            f"the train split of {indexed.prefix} is empty ({len(indexed)} documents, "
            f"split {options.split!r}); use more data or a larger train share in data.split"
        )
    return out


def build_gpt_datasets(
    indexed: Sequence[IndexedDataset],
    weights: Sequence[float] | None,
    tokenizer: Tokenizer,
    options: GPTDataOptions,
    *,
    num_samples: Mapping[str, int | None],
) -> Splits:
    """Train, valid and test datasets over one or several indexed datasets, as Megatron builds.

    One dataset without weights: its splits. Several: each is split alike and the splits are
    blended by ``weights`` (each part built with a 0.5% surplus of samples; a split without a
    sample count blends as many samples as no part runs out of), or without weights by the
    parts' sizes.
    """
    sizes = [num_samples.get(name) for name in SPLITS]
    if len(indexed) == 1 and weights is None:
        return tuple(split_datasets(indexed[0], tokenizer, options, sizes))  # type: ignore[return-value]
    if weights is not None:
        weights = normalize(weights)
        parts = [
            [n if not n else math.ceil(math.ceil(n * w) * (1 + BLEND_SURPLUS)) for n in sizes]
            for w in weights
        ]
    else:
        parts = [[0 if n == 0 else None for n in sizes] for _ in indexed]
    per_dataset = [
        split_datasets(ds, tokenizer, options, part)
        for ds, part in zip(indexed, parts, strict=True)
    ]
    out: list[Any] = []
    for s, name in enumerate(SPLITS):
        members = [per_dataset[d][s] for d in range(len(indexed))]
        if sizes[s] == 0 or all(m is None for m in members):
            out.append(None)
            continue
        if any(m is None for m in members):
            missing = [str(indexed[d].prefix) for d, m in enumerate(members) if m is None]
            raise McoreError(
                f"the {name} split of {', '.join(missing)} is empty, so it cannot be blended; "
                f"use more data or change data.split ({options.split!r})"
            )
        if weights is None:
            w = [float(len(m)) for m in members]
            size = sum(len(m) for m in members)
            cap = sizes[s]
            size = size if cap is None else min(cap, size)
        else:
            w = weights
            size = sizes[s]
            if size is None:
                size = min(int(len(m) / wi) for m, wi in zip(members, w, strict=True))
        if options.cache_dir is not None:
            blend_cache = Path(options.cache_dir)
        else:
            blend_cache = Path(str(indexed[0].prefix)) / "cache" / "BlendedDataset_indices"
        out.append(BlendedDataset(members, w, size, cache_dir=blend_cache, split=name))
    return tuple(out)  # type: ignore[return-value]


def build_python_stdlib(
    config: Any, tokenizer: Tokenizer, *, num_samples: Mapping[str, int | None]
) -> Splits:
    """Registry entry ``python_stdlib``: this interpreter's standard library source.

    Tokenized once into ``data.cache_dir`` (default ``~/.cache/mcore``, or
    ``$MCORE_CACHE_DIR``), sample indices in its ``GPTDataset_indices`` folder; no downloads.
    """
    data = data_section(config)
    root = Path(data.cache_dir) if data.cache_dir else default_cache_root()
    indexed = stdlib_dataset(tokenizer, root, max_bytes=getattr(data, "max_bytes", None))
    options = GPTDataOptions.from_config(config, tokenizer)
    options = dataclasses.replace(options, cache_dir=root / "GPTDataset_indices")
    return build_gpt_datasets([indexed], None, tokenizer, options, num_samples=num_samples)


def build_indexed(
    config: Any, tokenizer: Tokenizer, *, num_samples: Mapping[str, int | None]
) -> Splits:
    """Registry entry ``indexed``: the Megatron ``.bin``/``.idx`` prefixes of ``data.data_path``.

    ``["0.7", "a", "0.3", "b"]`` blends a and b 70/30; ``["a", "b"]`` blends by size.
    """
    data = data_section(config)
    if not data.data_path:
        raise McoreError(
            "data.dataset = 'indexed' needs data.data_path: dataset prefixes (PREFIX.bin and "
            "PREFIX.idx), made with `mcore data prepare INPUT --output-prefix PREFIX`"
        )
    prefixes, weights = parse_data_path(data.data_path)
    indexed = [IndexedDataset(p) for p in prefixes]
    options = GPTDataOptions.from_config(config, tokenizer)
    return build_gpt_datasets(indexed, weights, tokenizer, options, num_samples=num_samples)


def build_datasets(
    config: Any, tokenizer: Tokenizer, *, num_samples: Mapping[str, int | None]
) -> Splits:
    """The datasets ``data.dataset`` names, from the ``dataset`` registry."""
    from mcore.core.plugins import get_registry

    build = get_registry("dataset").get(data_section(config).dataset)
    return build(config, tokenizer, num_samples=num_samples)
