"""Reading and writing sharded tensors with ``torch.distributed.checkpoint`` (DCP).

Each :class:`~mcore.parallel.sharding.ShardedTensor` reaches DCP as a tensor that carries its
pieces (the hooks DCP asks a ``DTensor`` for: ``__create_write_items__``,
``__create_chunk_list__``, ``__get_tensor_shard__``), so DCP writes every piece at its global
offset, writes identical pieces of replicas once, and on load reads exactly the stored chunks
that overlap each piece: any layout loads any other.

On top of DCP this module adds what a trainer needs to trust a checkpoint:

- metadata is unpickled by an allow-list (DCP's own metadata classes, ``torch.Size``, dtypes),
  never as arbitrary objects; tensor data is read with ``weights_only``;
- every data file's size and CRC-32 are recorded at save time (:func:`write` returns them), and
  :func:`check_files` finds a missing, truncated or corrupted file before any tensor is read;
- a save can be aborted between files (:class:`threading.Event`), failing on every rank.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import threading
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from mcore.ckpt.errors import CheckpointingException
from mcore.parallel.sharding import ShardedTensor

METADATA = ".metadata"


class _Pieces(torch.Tensor):
    """A storage-less tensor of the global shape that hands DCP a rank's pieces of it."""

    sharded: ShardedTensor

    @staticmethod
    def __new__(cls, sharded: ShardedTensor) -> _Pieces:
        device = sharded.pieces[0][0].device if sharded.pieces else torch.device("cpu")
        t = torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(sharded.global_shape), dtype=sharded.dtype, device=device
        )
        t.sharded = sharded
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise CheckpointingException(f"checkpoint pieces support no tensor ops (got {func})")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        items = []
        for i, (data, offset) in enumerate(self.sharded.pieces):
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=data.shape)
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn, torch.Size(offset), i),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=chunk,
                        properties=TensorProperties.create_from_tensor(data),
                        size=torch.Size(self.sharded.global_shape),
                    ),
                )
            )
        return items

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [
            ChunkStorageMetadata(offsets=torch.Size(offset), sizes=data.shape)
            for data, offset in self.sharded.pieces
        ]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.sharded.pieces):
            data, offset = self.sharded.pieces[index.index]
            if torch.Size(offset) == index.offset:
                return data
        for data, offset in self.sharded.pieces:
            if torch.Size(offset) == index.offset:
                return data
        raise CheckpointingException(f"{index.fqn}: no piece at offset {tuple(index.offset or ())}")


def to_dcp(tensors: Mapping[str, ShardedTensor | torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict DCP writes or reads: pieces wrapped, plain tensors (replicated) as they
    are. Keys with no piece on this rank are left out (another rank holds them)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if isinstance(value, ShardedTensor):
            if value.pieces:
                out[key] = _Pieces(value)
        else:
            out[key] = value
    return out


class _Writer(FileSystemWriter):
    """DCP's file writer that can be aborted between files and reports what it wrote."""

    def __init__(self, path: Path, abort: threading.Event | None) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._abort = abort
        self.files: list[str] = []

    def _check_abort(self) -> None:
        if self._abort is not None and self._abort.is_set():
            raise CheckpointingException("the checkpoint save was aborted")

    def write_data(self, plan: Any, planner: Any) -> Any:
        self._check_abort()
        results = super().write_data(plan, planner).wait()
        self._check_abort()
        self.files = sorted({r.storage_data.relative_path for r in results})
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(results)
        return done


def write(
    path: Path,
    tensors: Mapping[str, ShardedTensor | torch.Tensor],
    *,
    group: dist.ProcessGroup | None,
    abort: threading.Event | None = None,
) -> dict[str, dict[str, int]]:
    """Write ``tensors`` into the DCP directory ``path`` (every rank calls it); returns this
    rank's data files with their size and CRC-32."""
    writer = _Writer(path, abort)
    try:
        with _single_process_quietly(group):
            dcp.save(
                to_dcp(tensors), storage_writer=writer, process_group=group, no_dist=group is None
            )
    except (Exception, CheckpointException) as exc:
        raise _explained(exc, f"writing the checkpoint {str(path)!r} failed") from exc
    return {name: _file_info(path / name) for name in writer.files}


def _explained(exc: BaseException, what: str) -> CheckpointingException:
    """Our own error as it was raised (DCP wraps every rank's failure in one exception, which
    is not even an ``Exception``), or a :class:`CheckpointingException` saying what failed."""
    if isinstance(exc, CheckpointingException):
        return exc
    failures = sorted((getattr(exc, "failures", None) or {}).items())
    causes = [(rank, pair[0] if isinstance(pair, tuple) else pair) for rank, pair in failures]
    for _, cause in causes:
        if isinstance(cause, CheckpointingException):
            return cause
    if causes:
        rank, cause = causes[0]
        return CheckpointingException(f"{what} on rank {rank}: {type(cause).__name__}: {cause}")
    return CheckpointingException(f"{what}: {exc}")


@contextlib.contextmanager
def _single_process_quietly(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Without a group a single-process save or load is what was asked for: no warning."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _file_info(path: Path) -> dict[str, int]:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return {"size": path.stat().st_size, "crc32": crc}


# -- reading ------------------------------------------------------------------------------------

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP metadata is made of: its own dataclasses, sizes, dtypes and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("collections", "OrderedDict"),
        }:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which is not part of DCP's metadata"
        )


class SafeReader(FileSystemReader):
    """DCP's file reader, with metadata unpickled through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_metadata(Path(self.path))


def read_metadata(path: Path) -> Metadata:
    """The DCP metadata of ``path``, or a clear error when it is missing or damaged."""
    file = path / METADATA
    if not file.is_file():
        raise CheckpointingException(
            f"{str(path)!r} is not a complete checkpoint: it has no {METADATA} file (a save "
            "that did not finish, or not a checkpoint directory)"
        )
    try:
        metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except Exception as exc:
        raise CheckpointingException(
            f"the checkpoint metadata {str(file)!r} is corrupt ({exc}); load an earlier checkpoint"
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointingException(f"{str(file)!r} does not hold DCP metadata")
    return metadata


def check_files(
    path: Path,
    metadata: Metadata,
    manifest: Mapping[str, Mapping[str, int]] | None,
    *,
    group: dist.ProcessGroup | None = None,
    checksums: bool = True,
) -> None:
    """Raise if a data file the metadata refers to is missing, shorter than what it must hold,
    or (with the ``manifest`` written at save) of another size or, with ``checksums``, CRC-32.

    With a ``group`` the ranks share the checksum work (each reads ``1 / world`` of the files)
    and every rank raises the first problem any of them found.
    """
    problem = None
    try:
        _check_files(path, metadata, manifest, group, checksums)
    except CheckpointingException as exc:
        problem = str(exc)
    if group is not None:
        found: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, problem, group=group)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise CheckpointingException(problem)


def _check_files(
    path: Path,
    metadata: Metadata,
    manifest: Mapping[str, Mapping[str, int]] | None,
    group: dist.ProcessGroup | None,
    checksums: bool,
) -> None:
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointingException(
                f"the checkpoint {str(path)!r} is missing its shard file {name!r} (was it copied "
                "completely?)"
            )
        size = file.stat().st_size
        if size < end:
            raise CheckpointingException(
                f"the checkpoint shard {str(file)!r} is truncated: {size} bytes, but it must hold "
                f"at least {end}"
            )
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    for i, (name, expected) in enumerate(sorted((manifest or {}).items())):
        file = path / name
        if not file.is_file():
            raise CheckpointingException(
                f"the checkpoint {str(path)!r} is missing its shard file {name!r}"
            )
        if file.stat().st_size != expected["size"]:
            raise CheckpointingException(
                f"the checkpoint shard {str(file)!r} has {file.stat().st_size} bytes, "
                f"{expected['size']} were written: it is truncated or was overwritten"
            )
        if not checksums or i % world != rank:
            continue
        got = _file_info(file)
        if got["size"] != expected["size"]:
            raise CheckpointingException(
                f"the checkpoint shard {str(file)!r} has {got['size']} bytes, {expected['size']} "
                "were written: it is truncated or was overwritten"
            )
        if got["crc32"] != expected["crc32"]:
            raise CheckpointingException(
                f"the checkpoint shard {str(file)!r} is corrupt: its CRC-32 does not match the "
                "one recorded when it was written"
            )


def check_request(
    path: Path, metadata: Metadata, tensors: Mapping[str, ShardedTensor | torch.Tensor]
) -> None:
    """Raise, naming the keys, if ``tensors`` asks for what the checkpoint lacks or shapes it
    differently (another model config than the one saved)."""
    stored = metadata.state_dict_metadata
    missing = [k for k in tensors if k not in stored]
    mismatched = []
    for key, value in tensors.items():
        md = stored.get(key)
        if not isinstance(md, TensorStorageMetadata):
            continue
        shape = value.global_shape if isinstance(value, ShardedTensor) else tuple(value.shape)
        if tuple(md.size) != tuple(shape):
            mismatched.append(f"{key}: checkpoint {tuple(md.size)}, this model {tuple(shape)}")
    if mismatched:
        shown = "; ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else "")
        raise CheckpointingException(
            f"the checkpoint {str(path)!r} was saved from another model config: {shown}. Load it "
            "with the model settings it was saved with (mcore ckpt inspect shows them)"
        )
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointingException(
            f"the checkpoint {str(path)!r} lacks {len(missing)} tensor(s) this run needs: {shown}"
        )


def read(
    path: Path,
    tensors: Mapping[str, ShardedTensor | torch.Tensor],
    *,
    group: dist.ProcessGroup | None,
    metadata: Metadata,
) -> None:
    """Load ``tensors`` in place from the DCP directory ``path`` (every rank calls it)."""
    check_request(path, metadata, tensors)
    try:
        with _single_process_quietly(group):
            dcp.load(
                to_dcp(tensors),
                storage_reader=SafeReader(path),
                process_group=group,
                no_dist=group is None,
            )
    except (Exception, CheckpointException) as exc:
        raise _explained(exc, f"reading the checkpoint {str(path)!r} failed") from exc
