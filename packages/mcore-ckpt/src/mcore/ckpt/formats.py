"""Checkpoint formats, the ``checkpoint_format`` registry's entries.

A format (:class:`mcore.ckpt.protocols.CheckpointFormat`) turns this rank's training state into
files in a folder and back:

- ``prepare(chunks, optimizer) -> prepared`` runs on the training thread (it may copy);
- ``write(folder, prepared, group=, abort=) -> {file: {"size", "crc32"}}`` writes this rank's
  files; it may run on a background thread (asynchronous saves), so it only touches
  ``prepared``;
- ``load(folder, chunks, optimizer, group=, common=)`` loads in place, resharding to this
  run's layout;
- ``load_model(folder, model)`` loads only the weights, on one process (inference, export);
- ``describe(folder) -> [{"key", "shape", "dtype", "bytes"}]`` lists the stored tensors.

``torch_dist``
    mcore's sharded format on ``torch.distributed.checkpoint``: model weights (fp32 main
    weights), optimizer state and random generator states as global tensors, which any
    TP/PP/DP/EP/FSDP layout loads.
``fsdp_dtensor``
    The layout ``megatron_fsdp.save_checkpoint`` writes and reads: ``model.*`` and
    ``optimizer.state.*`` only, the same global tensors. A folder saved by plain megatron_fsdp
    code loads into ``mcore train``, and mcore's loads into ``megatron_fsdp.load_checkpoint``.
``hf``
    Weights only, as a Hugging Face model folder (``config.json`` + safetensors) through the
    models' mappings; a run resumed from it starts a fresh optimizer.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mcore.ckpt import dcp_io, state
from mcore.ckpt.directory import COMMON
from mcore.ckpt.errors import CheckpointingException
from mcore.ckpt.plugin import RETIRED_FORMATS
from mcore.parallel.sharding import named_layouts, unwrap

if TYPE_CHECKING:
    from mcore.ckpt.protocols import CheckpointFormat
    from mcore.models import GPTModel


@dataclass
class DCPFormat:
    """A format on ``torch.distributed.checkpoint`` with a fixed choice of what it stores."""

    name: str
    rng: bool
    """Store (and restore) the random generators."""
    supports_async: bool = True
    weights_only: bool = False

    def prepare(self, chunks: list[nn.Module], optimizer: Any) -> dict[str, Any]:
        tensors = state.save_tensors(chunks, optimizer)
        if not self.rng:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
        return tensors

    def write(
        self,
        folder: Path,
        prepared: dict[str, Any],
        *,
        group: dist.ProcessGroup | None,
        abort: threading.Event | None = None,
    ) -> dict[str, dict[str, int]]:
        return dcp_io.write(folder, prepared, group=group, abort=abort)

    def load(
        self,
        folder: Path,
        chunks: list[nn.Module],
        optimizer: Any,
        *,
        group: dist.ProcessGroup | None,
        common: dict[str, Any],
        verify_checksums: bool = True,
    ) -> None:
        metadata = dcp_io.read_metadata(folder)
        dcp_io.check_files(
            folder, metadata, common.get("files"), group=group, checksums=verify_checksums
        )
        stored = metadata.state_dict_metadata
        model = state.model_tensors(chunks, for_save=False)
        optim: dict[str, Any] = {}
        if optimizer is not None and hasattr(optimizer, "sharded_state_dict"):
            wanted = optimizer.sharded_state_dict(named_layouts(chunks), for_load=True)
            has_state = any(k.startswith("optimizer.") for k in stored)
            # A weights-only checkpoint (imported, or exported without optimizer) keeps the
            # fresh optimizer state; the main weights still come from the stored fp32 weights.
            optim = {k: v for k, v in wanted.items() if has_state or k.startswith("model.")}
        if any(k in model for k in optim):
            # fp32 main weights that are copies read the same keys as the (rounded) model
            # parameters: a second pass. Otherwise one pass reads everything.
            dcp_io.read(folder, model, group=group, metadata=metadata)
            dcp_io.read(folder, optim, group=group, metadata=metadata)
        else:
            dcp_io.read(folder, {**model, **optim}, group=group, metadata=metadata)
        if optimizer is not None and hasattr(optimizer, "finish_load"):
            optimizer.finish_load()
        rng = {k: v for k, v in state.rng_tensors().items() if k in stored}
        world = dist.get_world_size() if dist.is_initialized() else 1
        rng = {k: v for k, v in rng.items() if _size(stored[k])[:1] == (world,)}
        if self.rng and rng:
            dcp_io.read(folder, rng, group=group, metadata=metadata)
            state.restore_rng(rng)

    def load_model(self, folder: Path, model: nn.Module) -> None:
        """Only the weights, into ``model`` of any layout, on this process alone (inference,
        export): no optimizer state, no generators, no collectives."""
        manifest = None
        if (folder / COMMON).is_file():
            manifest = json.loads((folder / COMMON).read_text()).get("files")
        metadata = dcp_io.read_metadata(folder)
        dcp_io.check_files(folder, metadata, manifest)
        dcp_io.read(folder, state.model_tensors([model], for_save=False), group=None,
                    metadata=metadata)  # fmt: skip

    def describe(self, folder: Path) -> list[dict[str, Any]]:
        metadata = dcp_io.read_metadata(folder)
        out = []
        for key, md in sorted(metadata.state_dict_metadata.items()):
            if not isinstance(md, TensorStorageMetadata):
                # bytes (e.g. a megatron_fsdp optimizer's param_groups)
                out.append({"key": key, "shape": None, "dtype": "bytes", "bytes": None})
                continue
            size = md.size
            dtype = md.properties.dtype
            numel = 1
            for d in size:
                numel *= d
            element = dtype.itemsize
            out.append(
                {
                    "key": key,
                    "shape": list(size),
                    "dtype": str(dtype).removeprefix("torch."),
                    "bytes": numel * element,
                }
            )
        return out


@dataclass
class HFFormat:
    """Weights only, as a Hugging Face folder, written through ``mcore.models.hf``."""

    name: str = "hf"
    supports_async: bool = False
    weights_only: bool = True

    def prepare(self, chunks: list[nn.Module], optimizer: Any) -> list[nn.Module]:
        ps = getattr(unwrap(chunks[0]), "parallel_state", None) if chunks else None
        if len(chunks) != 1 or (ps is not None and ps.pp_size > 1):
            raise CheckpointingException(
                "checkpoint.ckpt_format = 'hf' writes one whole model and supports no pipeline "
                "stages; save torch_dist and convert it with mcore ckpt export-hf"
            )
        return chunks

    def write(
        self,
        folder: Path,
        prepared: list[nn.Module],
        *,
        group: dist.ProcessGroup | None,
        abort: threading.Event | None = None,
    ) -> dict[str, dict[str, int]]:
        from mcore.models.hf import save_hf

        save_hf(cast("GPTModel", unwrap(prepared[0])), folder)
        return {}

    def load(
        self,
        folder: Path,
        chunks: list[nn.Module],
        optimizer: Any,
        *,
        group: dist.ProcessGroup | None,
        common: dict[str, Any],
        verify_checksums: bool = True,
    ) -> None:
        raise CheckpointingException(
            f"{str(folder)!r} is a Hugging Face export (weights only): import it with "
            "mcore ckpt import-hf, then train from the imported checkpoint"
        )

    def load_model(self, folder: Path, model: nn.Module) -> None:
        raise CheckpointingException(
            f"{str(folder)!r} is a Hugging Face export: load the folder itself as a Hugging "
            "Face model (mcore.models.hf.load_hf, or mcore generate --model FOLDER)"
        )

    def describe(self, folder: Path) -> list[dict[str, Any]]:
        from safetensors import safe_open

        out = []
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    info = f.get_slice(key)
                    shape = list(info.get_shape())
                    dtype = info.get_dtype()
                    numel = 1
                    for d in shape:
                        numel *= d
                    element = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}.get(dtype, 4)
                    out.append({"key": key, "shape": shape, "dtype": dtype.lower(),
                                "bytes": numel * element})  # fmt: skip
        return out


def _size(md: Any) -> tuple[int, ...]:
    """A stored tensor's global shape (``()`` for bytes)."""
    return tuple(md.size) if isinstance(md, TensorStorageMetadata) else ()


TORCH_DIST = DCPFormat("torch_dist", rng=True)
FSDP_DTENSOR = DCPFormat("fsdp_dtensor", rng=False)
HF = HFFormat()


def get_format(name: str) -> CheckpointFormat:
    """The format registered as ``name``; retired Megatron formats say what to use instead."""
    if name in RETIRED_FORMATS:
        raise CheckpointingException(
            f"checkpoint format {name!r} is not supported; use {RETIRED_FORMATS[name]!r} "
            "(sharded, resharding on load)"
        )
    from mcore.core import get_registry

    return get_registry("checkpoint_format").get(name)


__all__ = ["FSDP_DTENSOR", "HF", "TORCH_DIST", "DCPFormat", "HFFormat", "get_format"]
