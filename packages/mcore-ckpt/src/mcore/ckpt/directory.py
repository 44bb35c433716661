"""A checkpoint directory: ``iter_NNNNNNN/`` folders, a ``latest`` pointer, atomic publishing.

::

    <save>/
      latest                    "iter_0000020": the newest complete checkpoint
      iter_0000010/             complete checkpoints (common.json + the format's files)
      iter_0000020/
      iter_0000030.tmp/         a save in progress (or one a crash cut short)

A save writes everything into ``iter_N.tmp/``; only when every rank has finished does rank 0
make it durable (fsync), rename it to ``iter_N/`` and then replace ``latest`` (write a temporary
file, fsync, rename). A process killed at any moment therefore leaves ``latest`` naming a
complete checkpoint; leftover ``.tmp`` folders are removed before the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mcore.ckpt.errors import CheckpointingException

LATEST = "latest"
COMMON = "common.json"
_ITER = re.compile(r"^iter_(\d{7,})$")


def fsync_dir(path: Path) -> None:
    """Make a rename or new file inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def tmp_dir(root: Path, iteration: int) -> Path:
    return root / f"{iteration_name(iteration)}.tmp"


def published(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _ITER.match(child.name)
        if match and child.is_dir() and (child / COMMON).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or ``None`` when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _ITER.match(name):
        raise CheckpointingException(
            f"{str(pointer)!r} is damaged: it holds {name[:60]!r}, not a checkpoint name like "
            "iter_0000010"
        )
    path = root / name
    if not (path / COMMON).is_file():
        raise CheckpointingException(
            f"{str(pointer)!r} names {name}, which is not a complete checkpoint in {str(root)!r}"
        )
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint to load: ``path`` itself (an ``iter_N`` folder or an exported one), or the
    one its ``latest`` names."""
    path = Path(path)
    if (path / COMMON).is_file() or (path / ".metadata").is_file():
        return path  # an mcore checkpoint, or a DCP folder megatron_fsdp saved
    found = latest(path)
    if found is not None:
        return found
    if not path.exists():
        raise CheckpointingException(f"checkpoint.load: {str(path)!r} does not exist")
    raise CheckpointingException(
        f"{str(path)!r} holds no complete checkpoint (no {LATEST} pointer and no {COMMON}); "
        "point checkpoint.load at a save directory or at one of its iter_* folders"
    )


def clean_stale(root: Path) -> None:
    """Remove ``.tmp`` folders of saves that never finished (rank 0, with no save running)."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith(".tmp") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def publish(root: Path, tmp: Path, iteration: int) -> Path:
    """Make the finished ``tmp`` the checkpoint of ``iteration`` and point ``latest`` at it."""
    final = root / iteration_name(iteration)
    for child in tmp.iterdir():
        if child.is_file():
            fd = os.open(child, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(tmp)
    if final.exists():  # saved again at the same step: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / LATEST)
    fsync_dir(root)
    return final


def prune(root: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (never the one ``latest`` names)."""
    if not keep_last:
        return []
    keep = latest(root)
    done = published(root)
    removed = []
    for _, path in done[: max(0, len(done) - keep_last)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
