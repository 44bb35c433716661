"""Hugging Face interop: build a ``GPTModel`` from a HF directory and write one back.

``load_hf(path, parallel_state)`` reads config.json, builds the model for this rank's parallel
layout and loads the weights, each rank reading only the slices of the safetensors files it owns.
``save_hf(model, path)`` gathers the TP shards and writes config.json + model.safetensors that
``transformers`` loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mcore.core import McoreError, get_plugin_manager
from mcore.models.config import TransformerConfig
from mcore.models.gpt import GPTModel
from mcore.models.hf.architectures import HFArchitecture, ParamMap
from mcore.parallel import ParallelState

__all__ = [
    "HFArchitecture",
    "ParamMap",
    "architecture_for",
    "hf_state_dict",
    "load_hf",
    "read_hf_config",
    "save_hf",
]


def architecture_for(name: str) -> HFArchitecture:
    """The registered mapping of HF architecture ``name`` (e.g. ``LlamaForCausalLM``)."""
    return get_plugin_manager().registries.get("hf_architecture", name)


def read_hf_config(path: str | Path) -> tuple[HFArchitecture, TransformerConfig]:
    """The architecture mapping and the ``TransformerConfig`` of the HF directory ``path``."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise McoreError(f"{str(path)!r} is not a Hugging Face model directory: no config.json")
    hf = json.loads(config_file.read_text())
    names = hf.get("architectures") or []
    if not names:
        raise McoreError(f"{config_file}: 'architectures' is missing; cannot tell the model type")
    arch = architecture_for(names[0])
    return arch, arch.to_config(hf)


def _expand(pm: ParamMap, num_layers: int) -> Iterator[tuple[str, tuple[str, ...]]]:
    """``(mcore name, HF names)`` for every layer a per-layer mapping covers (or once)."""
    for i in range(num_layers) if pm.per_layer() else [None]:
        if i is None:
            yield pm.mcore, pm.hf
        else:
            yield pm.mcore.format(i=i), tuple(h.format(i=i) for h in pm.hf)


class _SafetensorsReader:
    """Reads tensors, or slices of them, from one or many safetensors files of a directory."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(path.glob("*.safetensors"))]
            if not files:
                raise McoreError(f"{str(path)!r} holds no .safetensors files")
            weight_map = None
        self._handles = {f: safe_open(str(path / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}  # noqa: SIM118
        self._where = weight_map

    def _slice(self, name: str) -> Any:
        if name not in self._where:
            raise McoreError(f"tensor {name!r} is missing from the checkpoint")
        return self._handles[self._where[name]].get_slice(name)

    def rows(self, name: str, rank: int, parts: int) -> torch.Tensor:
        sl = self._slice(name)
        n = sl.get_shape()[0]
        if n % parts:
            raise McoreError(f"{name}: dim 0 of size {n} does not split into {parts} TP shards")
        size = n // parts
        return sl[rank * size : (rank + 1) * size]

    def cols(self, name: str, rank: int, parts: int) -> torch.Tensor:
        sl = self._slice(name)
        n = sl.get_shape()[1]
        if n % parts:
            raise McoreError(f"{name}: dim 1 of size {n} does not split into {parts} TP shards")
        size = n // parts
        return sl[:, rank * size : (rank + 1) * size]

    def full(self, name: str) -> torch.Tensor:
        return self._slice(name)[:]


def _local_tensor(
    reader: _SafetensorsReader, split: str, names: tuple[str, ...], ps
) -> torch.Tensor:
    r, n = ps.tp_rank, ps.tp_size
    if split in ("column", "vocab"):
        return torch.cat([reader.rows(h, r, n) for h in names], dim=0)
    if split == "row":
        return reader.cols(names[0], r, n)
    return reader.full(names[0])


def load_hf(
    path: str | Path,
    parallel_state: ParallelState | None = None,
    *,
    config_overrides: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> GPTModel:
    """Build a ``GPTModel`` from the HF directory ``path`` and load its weights.

    Each rank reads only its own TP slices of the safetensors files. ``config_overrides`` change
    fields that do not alter the weights (``attention_backend``, ``recompute_granularity``);
    ``model_kwargs`` go to ``GPTModel`` (e.g. ``sequence_parallel=True``).
    """
    path = Path(path)
    arch, config = read_hf_config(path)
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    ps = parallel_state or ParallelState()
    model = GPTModel(config, ps, **model_kwargs)
    reader = _SafetensorsReader(path)
    state = model.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        for pm in arch.params(config):
            for name, hf_names in _expand(pm, config.num_layers):
                if name not in state:
                    raise McoreError(f"{arch.name} maps to {name!r}, which the model does not have")
                tensor = _local_tensor(reader, pm.split, hf_names, ps)
                if tensor.shape != state[name].shape:
                    raise McoreError(
                        f"{name}: checkpoint gives shape {tuple(tensor.shape)} for this rank, "
                        f"the model expects {tuple(state[name].shape)}; does config.json match "
                        f"the weights?"
                    )
                state[name].copy_(tensor)
                loaded.add(name)
    missing = [k for k in state if k not in loaded and not k.endswith("inv_freq")]
    if missing:
        raise McoreError(f"{arch.name} mapping left parameters unloaded: {missing[:5]}")
    model.hf_architecture = arch.name
    return model


def _part_sizes(model: GPTModel, name: str, parts: int, rows: int) -> list[int]:
    """Global row sizes of the fused parts of parameter ``name`` (q, k, v may differ)."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    sizes = getattr(module, "partitions", None)
    if sizes and len(sizes) == parts:
        return list(sizes)
    return [rows // parts] * parts


def _gather_full(
    local: torch.Tensor, split: str, sizes: list[int], ps: ParallelState
) -> torch.Tensor:
    """The global tensor from every TP rank's shard (fused parts reassembled in order)."""
    if ps.tp_size == 1 or split == "replicated":
        return local
    shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=ps.tp_group)
    if split == "row":
        return torch.cat(shards, dim=1)
    # Column shards hold [part0_r | part1_r | ...]: regroup part by part.
    local_sizes = [s // ps.tp_size for s in sizes]
    per_rank = [s.split(local_sizes, dim=0) for s in shards]
    return torch.cat([torch.cat([pr[p] for pr in per_rank], dim=0) for p in range(len(sizes))])


def hf_state_dict(
    model: GPTModel, architecture: str | None = None, *, grads: bool = False
) -> dict[str, torch.Tensor]:
    """The model's full (TP-gathered) tensors under Hugging Face names, on the CPU.

    With ``grads=True`` the parameters' gradients instead, which is how tests compare gradients
    under any TP layout with ``transformers``. Every TP rank must call this.
    """
    arch = architecture_for(architecture or default_architecture(model))
    config, ps = model.config, model.parallel_state
    if grads:
        params = dict(model.named_parameters())
        state = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()
        }
    else:
        state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for pm in arch.params(config):
            for name, hf_names in _expand(pm, config.num_layers):
                local = state[name]
                rows = local.shape[0] * (ps.tp_size if pm.split in ("column", "vocab") else 1)
                sizes = _part_sizes(model, name, len(hf_names), rows)
                full = _gather_full(local, pm.split, sizes, ps)
                for hf_name, part in zip(hf_names, full.split(sizes, dim=0), strict=True):
                    tensors[hf_name] = part.contiguous().cpu()
    return tensors


def default_architecture(model: GPTModel) -> str:
    """The architecture a model was loaded from, else Qwen3 for qk-norm models, else Llama."""
    return getattr(model, "hf_architecture", None) or (
        "Qwen3ForCausalLM" if model.config.qk_layernorm else "LlamaForCausalLM"
    )


def save_hf(model: GPTModel, path: str | Path, architecture: str | None = None) -> None:
    """Write ``model`` as a HF directory (config.json + model.safetensors) at ``path``.

    ``architecture`` defaults to :func:`default_architecture`. Every TP rank must call this (the
    shards are gathered); only the first rank of the other parallel dims writes, each file under
    a temporary name and then renamed, so a reader never sees a half-written file.
    """
    from safetensors.torch import save_file

    architecture = architecture or default_architecture(model)
    hf_config = architecture_for(architecture).from_config(model.config)
    tensors = hf_state_dict(model, architecture)
    ps = model.parallel_state
    if ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0 and ps.pp_rank == 0:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / "model.safetensors")
        (out / "config.json.tmp").write_text(json.dumps(hf_config, indent=2))
        (out / "config.json.tmp").replace(out / "config.json")
    if dist.is_initialized():
        dist.barrier()
