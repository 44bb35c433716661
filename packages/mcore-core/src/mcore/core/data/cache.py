"""On-disk caches of dataset indices: ``.npy`` files keyed by a hash of what built them.

Files are named as Megatron-LM names them (``<md5>-GPTDataset-train-sample_index.npy`` beside
``<md5>-GPTDataset-train-description.txt``). Every file is written to a temporary name and
renamed, the description last, and builders hold a lock file, so ranks that start together
build once and never read a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def describe(identifiers: dict[str, Any]) -> tuple[str, str]:
    """``(description, md5)`` of ``identifiers``: the JSON text and the hash used in names."""
    text = json.dumps(identifiers, indent=4, sort_keys=True, default=str)
    return text, hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def default_cache_root() -> Path:
    """``$MCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mcore``, else ``~/.cache/mcore``."""
    if os.environ.get("MCORE_CACHE_DIR"):
        return Path(os.environ["MCORE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mcore"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, path)


def cached_arrays(
    cache_dir: Path | None,
    stem: str,
    identifiers: dict[str, Any],
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], bool]:
    """Load arrays ``names`` cached under ``cache_dir``, or ``build()`` and save them.

    Returns ``(arrays, hit)``; ``hit`` says they came from disk (memory-mapped). With no
    ``cache_dir``, or one that cannot be written, the arrays are built and kept in memory.
    """
    description, digest = describe(identifiers)
    if cache_dir is None:
        return build(), False
    base = f"{digest}-{stem}"
    paths = {name: cache_dir / f"{base}-{name}.npy" for name in names}
    description_path = cache_dir / f"{base}-description.txt"

    def load() -> dict[str, np.ndarray] | None:
        if not description_path.is_file() or not all(p.is_file() for p in paths.values()):
            return None
        return {name: np.load(p, mmap_mode="r", allow_pickle=False) for name, p in paths.items()}

    found = load()
    if found is not None:
        return found, True
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(
            f"cannot write the index cache {cache_dir}; indices are rebuilt in memory each run",
            stacklevel=3,
        )
        return build(), False
    with file_lock(cache_dir / f".{base}.lock"):
        found = load()  # another rank may have built them while this one waited
        if found is not None:
            return found, True
        arrays = build()
        for name, path in paths.items():
            _atomic_write(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
        _atomic_write(description_path, lambda f: f.write(description), mode="w")
        return arrays, False
