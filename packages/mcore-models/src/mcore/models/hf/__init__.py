"""Hugging Face interop: build a ``GPTModel`` from a HF directory and write one back.

``load_hf(path, parallel_state)`` reads config.json, builds the model for this rank's parallel
layout and loads the weights, each rank reading only the slices of the safetensors files it owns
(its TP shard of dense weights; its EP rank's experts, each its ETP shard). ``save_hf(model,
path)`` gathers the shards and writes config.json + model.safetensors that ``transformers``
loads. Architectures (:class:`HFArchitecture`) say how names and config fields map; MoE ones
come with mcore-moe and add a ``moe`` config section to the model.

Multi-token-prediction depths (``model.mtp``) map like the main layers: an architecture lists
each depth's norms and projection (:func:`mtp_depth_params`) and moves the main layers' maps
onto the depth's block (:func:`mtp_block_params`). Whether a checkpoint has them is settled by
its weights as well as its config.json (:func:`read_hf_config`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from mcore.core import McoreError, get_plugin_manager
from mcore.models.config import TransformerConfig
from mcore.models.gpt import GPTModel
from mcore.models.hf.architectures import (
    Deinterleave,
    HFArchitecture,
    ParamMap,
    RowTransform,
    Sections,
)
from mcore.models.hybrid import MTP_SEPARATOR
from mcore.models.layer import gpt_layer_spec
from mcore.parallel import ParallelState
from mcore.parallel.init import materialize
from mcore.parallel.sharding import checkpoint_key

__all__ = [
    "Deinterleave",
    "HFArchitecture",
    "HFConfig",
    "ParamMap",
    "RowTransform",
    "architecture_for",
    "default_architecture",
    "hf_state_dict",
    "load_hf",
    "model_sections",
    "mtp_block_params",
    "mtp_depth_params",
    "read_hf_config",
    "save_hf",
    "without_mtp",
]


def architecture_for(name: str) -> HFArchitecture:
    """The registered mapping of HF architecture ``name`` (e.g. ``LlamaForCausalLM``)."""
    return get_plugin_manager().registries.get("hf_architecture", name)


class HFConfig(NamedTuple):
    """What a HF directory's config.json says, in mcore's terms."""

    architecture: HFArchitecture
    config: TransformerConfig
    sections: dict[str, Any]
    """Config sections of other packages the model needs, e.g. ``{"moe": MoEConfig(...)}``."""


def read_hf_config(path: str | Path) -> HFConfig:
    """The architecture mapping, ``TransformerConfig`` and sections of the HF directory ``path``.

    The multi-token-prediction depths are those config.json declares and the safetensors files
    hold (see :func:`_settle_mtp`); a directory without weight files gets what config.json says.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise McoreError(f"{str(path)!r} is not a Hugging Face model directory: no config.json")
    hf = json.loads(config_file.read_text())
    names = hf.get("architectures") or []
    if not names:
        raise McoreError(f"{config_file}: 'architectures' is missing; cannot tell the model type")
    arch = architecture_for(names[0])
    config, sections = arch.to_config(hf), dict(arch.sections_from_hf(hf))
    config, sections = _settle_mtp(Path(path), arch, hf, config, sections)
    return HFConfig(arch, config, sections)


# --- multi-token prediction -------------------------------------------------------------------

_MTP_COUNT_FIELDS = ("num_nextn_predict_layers", "num_mtp_layers")
"""The config.json fields that count the multi-token-prediction depths (transformers reads the
second as an alias of the first)."""


def mtp_depth_params(
    depth: int, *, enorm: str, hnorm: str, eh_proj: str, final_layernorm: str
) -> list[ParamMap]:
    """The tensors of multi-token-prediction depth ``depth`` (0-based) outside its layers: the
    two input norms, the projection of their concatenation (replicated over TP, like mcore's
    ``eh_proj``) and the output norm, from the HF tensors named."""
    mcore = f"mtp.layers.{depth}"
    return [
        ParamMap(f"{mcore}.enorm.weight", (enorm,), "replicated"),
        ParamMap(f"{mcore}.hnorm.weight", (hnorm,), "replicated"),
        ParamMap(f"{mcore}.eh_proj.weight", (eh_proj,), "replicated"),
        ParamMap(f"{mcore}.final_layernorm.weight", (final_layernorm,), "replicated"),
    ]


def mtp_block_params(
    params: list[ParamMap], depth: int, layer: int, hf_layer: int
) -> list[ParamMap]:
    """Per-layer maps of the main stack (mcore names ``layers.{i}....``) moved onto layer
    ``layer`` of multi-token-prediction depth ``depth``'s block: mcore names under
    ``mtp.layers.{depth}.block.{layer}.``, ``{i}`` in the HF names set to ``hf_layer``.

    The maps' ``layers`` restriction is dropped: pass the maps of the layer the block holds
    (its MoE maps for an MoE layer, say), as an architecture builds them for one main layer.
    """
    out = []
    prefix = "layers.{i}."
    for pm in params:
        if not pm.mcore.startswith(prefix):
            raise ValueError(f"{pm.mcore}: not a per-layer map of the main stack ({prefix}...)")
        out.append(
            dataclasses.replace(
                pm,
                mcore=f"mtp.layers.{depth}.block.{layer}.{pm.mcore.removeprefix(prefix)}",
                hf=tuple(_fill(h, i=hf_layer) for h in pm.hf),
                layers=None,
            )
        )
    return out


def without_mtp(config: TransformerConfig) -> TransformerConfig:
    """``config`` without multi-token-prediction depths (a pattern's ``/`` blocks dropped)."""
    pattern = config.hybrid_override_pattern
    if pattern is not None:
        pattern = pattern.split(MTP_SEPARATOR)[0]
    return dataclasses.replace(
        config, hybrid_override_pattern=pattern, mtp_num_layers=None, mtp_loss_scaling_factor=None
    )


def _checkpoint_keys(path: Path) -> set[str] | None:
    """The tensor names of the safetensors files of ``path`` (headers only); None without any."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _hf_names(params: list[ParamMap], num_layers: int) -> set[str]:
    """Every HF tensor name ``params`` read (expert maps for each expert)."""
    names: set[str] = set()
    for pm in params:
        for _, hf_names in _expand(pm, num_layers):
            for name in hf_names:
                if pm.experts is None:
                    names.add(name)
                else:
                    names.update(_fill(name, e=e) for e in range(pm.experts))
    return names


def _mtp_names(arch: HFArchitecture, config: TransformerConfig, sections: Sections) -> set[str]:
    """The HF tensors of the model's multi-token-prediction depths (maps of ``mtp.*``)."""
    params = [pm for pm in arch.params(config, sections) if pm.mcore.startswith("mtp.")]
    return _hf_names(params, config.num_layers)


def _holds_mtp(
    keys: set[str], arch: HFArchitecture, config: TransformerConfig, sections: Sections
) -> bool:
    """Whether the checkpoint (tensor names ``keys``) holds any of ``config``'s MTP tensors."""
    try:
        return bool(_mtp_names(arch, config, sections) & keys)
    except NotImplementedError:
        # The mapping refuses these depths. Tensors the main model does not read count as
        # theirs: the load then says why it refuses, and a file without them loads without.
        main = without_mtp(config)
        return bool(keys - _hf_names(arch.params(main, sections), main.num_layers))


def _settle_mtp(
    path: Path,
    arch: HFArchitecture,
    hf: dict[str, Any],
    config: TransformerConfig,
    sections: dict[str, Any],
) -> tuple[TransformerConfig, dict[str, Any]]:
    """The model's multi-token-prediction depths, as config.json declares and the files hold.

    config.json alone is not enough. transformers writes DeepSeek-V3's default of one depth
    (``num_nextn_predict_layers: 1``) beside files without MTP weights, since its main model
    drops them on load; Qwen3-Next's released config.json states no count for weights that are
    there (vLLM assumes one depth). So declared depths whose tensors are all missing are
    dropped, and a config.json that states no count gets one depth when the files hold every
    tensor of it. A directory without safetensors files keeps what config.json says.
    """
    if config.mtp_depth:
        keys = _checkpoint_keys(path)
        if keys is None or _holds_mtp(keys, arch, config, sections):
            return config, sections
        return without_mtp(config), sections
    if any(name in hf for name in _MTP_COUNT_FIELDS):
        return config, sections
    one = {**hf, _MTP_COUNT_FIELDS[0]: 1}
    try:
        config_one, sections_one = arch.to_config(one), dict(arch.sections_from_hf(one))
        names = _mtp_names(arch, config_one, sections_one) if config_one.mtp_depth else set()
    except (NotImplementedError, McoreError):
        return config, sections
    if names and names <= (_checkpoint_keys(path) or set()):
        return config_one, sections_one
    return config, sections


def _fill(template: str, **values: int) -> str:
    """``template`` with ``{name}`` placeholders replaced (others, like ``{e}``, kept)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def _expand(pm: ParamMap, num_layers: int) -> Iterator[tuple[str, tuple[str, ...]]]:
    """``(mcore name, HF names)`` for every layer a per-layer mapping covers (or once); expert
    maps keep ``{e}`` in the HF names."""
    if not pm.per_layer():
        yield pm.mcore, pm.hf
        return
    for i in pm.layer_numbers(num_layers):
        yield _fill(pm.mcore, i=i), tuple(_fill(h, i=i) for h in pm.hf)


def _group(pm: ParamMap, ps: ParallelState) -> tuple[Any, int, int]:
    """``(group, rank, size)`` of the group ``pm`` is split over."""
    if pm.group == "etp":
        return ps.etp_group, ps.etp_rank, ps.etp_size
    return ps.tp_group, ps.tp_rank, ps.tp_size


def _local_experts(pm: ParamMap, ps: ParallelState) -> range:
    """The global numbers of this EP rank's experts."""
    assert pm.experts is not None
    if pm.experts % ps.ep_size:
        raise McoreError(
            f"{pm.mcore}: {pm.experts} experts do not divide over expert_model_parallel_size "
            f"({ps.ep_size})"
        )
    n = pm.experts // ps.ep_size
    return range(ps.ep_rank * n, (ps.ep_rank + 1) * n)


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
            raise McoreError(f"{name}: dim 0 of size {n} does not split into {parts} shards")
        size = n // parts
        return sl[rank * size : (rank + 1) * size]

    def blocks(self, name: str, rank: int, parts: int, sizes: tuple[int, ...]) -> torch.Tensor:
        """This rank's share of each dim-0 block of ``sizes`` rows, concatenated in order."""
        sl = self._slice(name)
        n = sl.get_shape()[0]
        if n != sum(sizes) or any(size % parts for size in sizes):
            raise McoreError(
                f"{name}: dim 0 of size {n} is not made of blocks {list(sizes)} that each split "
                f"into {parts} shards"
            )
        out, start = [], 0
        for size in sizes:
            share = size // parts
            out.append(sl[start + rank * share : start + (rank + 1) * share])
            start += size
        return torch.cat(out, dim=0)

    def cols(self, name: str, rank: int, parts: int) -> torch.Tensor:
        sl = self._slice(name)
        n = sl.get_shape()[1]
        if n % parts:
            raise McoreError(f"{name}: dim 1 of size {n} does not split into {parts} shards")
        size = n // parts
        return sl[:, rank * size : (rank + 1) * size]

    def full(self, name: str) -> torch.Tensor:
        return self._slice(name)[:]


def _read_shard(
    reader: _SafetensorsReader, pm: ParamMap, names: tuple[str, ...], rank: int, size: int
) -> torch.Tensor:
    """This rank's shard of the fused tensor made of HF tensors ``names``."""
    parts = []
    for name in names:
        if pm.parts is not None:
            part = reader.blocks(name, rank, size, pm.parts)
        elif pm.split in ("column", "vocab"):
            part = reader.rows(name, rank, size)
        elif pm.split == "row":
            part = reader.cols(name, rank, size)
        else:
            part = reader.full(name)
        if pm.rows is not None:
            try:
                part = pm.rows.to_mcore(part)
            except ValueError as exc:
                raise McoreError(f"{name}: {exc}") from None
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _local_tensor(
    reader: _SafetensorsReader, pm: ParamMap, names: tuple[str, ...], ps: ParallelState
) -> torch.Tensor:
    """What this rank holds of one mcore tensor: its shard, or its experts' shards stacked."""
    _, rank, size = _group(pm, ps)
    if pm.experts is None:
        return _read_shard(reader, pm, names, rank, size)
    return torch.stack(
        [
            _read_shard(reader, pm, tuple(_fill(h, e=e) for h in names), rank, size)
            for e in _local_experts(pm, ps)
        ]
    )


def load_hf(
    path: str | Path,
    parallel_state: ParallelState | None = None,
    *,
    config_overrides: dict[str, Any] | None = None,
    section_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **model_kwargs: Any,
) -> GPTModel:
    """Build a ``GPTModel`` from the HF directory ``path`` and load its weights.

    Each rank reads only its own slices of the safetensors files. ``config_overrides`` change
    fields that do not alter the weights (``attention_backend``, ``recompute_granularity``);
    ``section_overrides`` do the same for the architecture's sections (``{"moe":
    {"token_dispatcher_type": "allgather"}}``); ``model_kwargs`` go to ``GPTModel`` (e.g.
    ``sequence_parallel=True``).
    """
    path = Path(path)
    arch, config, sections = read_hf_config(path)
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    for name, changes in (section_overrides or {}).items():
        if name not in sections:
            raise McoreError(
                f"section_overrides names [{name}], but {arch.name} has only "
                f"{sorted(sections) or 'no sections'}"
            )
        sections[name] = dataclasses.replace(sections[name], **changes)
    ps = parallel_state or ParallelState()
    device = torch.get_default_device()
    with torch.device("meta"):  # every weight is about to be read: draw none
        model = GPTModel(config, ps, sections=sections, **model_kwargs)
    materialize(model, device=device, seed=model.init_seed, initialize=False)
    reader = _SafetensorsReader(path)
    state = model.state_dict(keep_vars=True)
    # A tensor stored under another's name (the last stage's copy of tied embeddings) loads
    # from that name's HF tensor.
    targets: dict[str, list[str]] = {}
    for key, tensor in state.items():
        targets.setdefault(checkpoint_key(key, tensor), []).append(key)
    loaded: set[str] = set()
    with torch.no_grad():
        for pm in arch.params(config, sections):
            for name, hf_names in _expand(pm, config.num_layers):
                if name not in targets:
                    if ps.pp_size > 1 and _on_another_stage(model, name):
                        continue
                    raise McoreError(f"{arch.name} maps to {name!r}, which the model does not have")
                tensor = _local_tensor(reader, pm, hf_names, ps)
                for key in targets[name]:
                    if tensor.shape != state[key].shape:
                        raise McoreError(
                            f"{key}: checkpoint gives shape {tuple(tensor.shape)} for this rank, "
                            f"the model expects {tuple(state[key].shape)}; does config.json "
                            "match the weights?"
                        )
                    state[key].copy_(tensor)
                    loaded.add(key)
    missing = [k for k in state if k not in loaded and not k.endswith("inv_freq")]
    if missing:
        raise McoreError(f"{arch.name} mapping left parameters unloaded: {missing[:5]}")
    model.hf_architecture = arch.name  # pyright: ignore[reportArgumentType] (a str attribute)
    return model


def _on_another_stage(model: GPTModel, name: str) -> bool:
    """Whether ``name`` lives on another pipeline stage: a layer this stage does not hold, or
    the embedding, final norm or output layer of a stage without them."""
    module: Any = model
    for atom in name.split(".")[:-1]:
        module = module._modules.get(atom) if isinstance(module, torch.nn.Module) else None
        if module is None:
            return True
    return False


def _part_sizes(model: GPTModel, name: str, parts: int, rows: int) -> list[int]:
    """Global row sizes of the fused parts of parameter ``name`` (q, k, v may differ)."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    sizes = getattr(module, "partitions", None)
    if sizes and len(sizes) == parts:
        return list(sizes)
    return [rows // parts] * parts


def _gather_shards(
    local: torch.Tensor, split: str, sizes: list[int], group: Any, size: int, dim: int
) -> torch.Tensor:
    """The tensor whole over ``group`` from every rank's shard, split along ``dim`` (rows) or
    ``dim + 1`` (row-parallel columns); fused parts are reassembled in order."""
    if size == 1 or split == "replicated":
        return local
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    if split == "row":
        return torch.cat(shards, dim=dim + 1)
    # Column shards hold [part0_r | part1_r | ...]: regroup part by part.
    local_sizes = [s // size for s in sizes]
    per_rank = [s.split(local_sizes, dim=dim) for s in shards]
    return torch.cat(
        [torch.cat([pr[p] for pr in per_rank], dim=dim) for p in range(len(sizes))], dim=dim
    )


def _gather_experts(local: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Every expert ``[experts, ...]`` from each EP rank's stack of local experts."""
    if ps.ep_size == 1:
        return local
    stacks = [torch.empty_like(local) for _ in range(ps.ep_size)]
    dist.all_gather(stacks, local.contiguous(), group=ps.ep_group)
    return torch.cat(stacks, dim=0)


def _emit(
    tensors: dict[str, torch.Tensor],
    pm: ParamMap,
    names: tuple[str, ...],
    full: torch.Tensor,
    sizes: list[int],
) -> None:
    """Split a whole mcore tensor into its HF tensors (in HF row order) on the CPU."""
    for hf_name, part in zip(names, full.split(sizes, dim=0), strict=True):
        if pm.rows is not None:
            part = pm.rows.to_hf(part)
        tensors[hf_name] = part.contiguous().cpu()


def model_sections(model: GPTModel) -> dict[str, Any]:
    """The config sections ``model`` was built with (``{}`` for a dense model)."""
    return dict(getattr(model, "sections", None) or {})


def hf_state_dict(
    model: GPTModel, architecture: str | None = None, *, grads: bool = False
) -> dict[str, torch.Tensor]:
    """The model's full (gathered) tensors under Hugging Face names, on the CPU.

    With ``grads=True`` the parameters' gradients instead (buffers such as an MoE router's
    expert bias are left out), which is how tests compare gradients under any layout with
    ``transformers``. Every rank must call this: TP shards are gathered over TP, experts over
    ETP and then EP.
    """
    arch = architecture_for(architecture or default_architecture(model))
    config, ps = model.config, model.parallel_state
    if grads:
        params = dict(model.named_parameters())
        state = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()
        }
        buffers = {n for n, _ in model.named_buffers()}
    else:
        state, buffers = model.state_dict(), set()
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for pm in arch.params(config, model_sections(model)):
            group, _, size = _group(pm, ps)
            stacked = pm.experts is not None
            dim = 1 if stacked else 0  # the rows of one expert follow the expert dim
            for name, hf_names in _expand(pm, config.num_layers):
                if name in buffers:
                    continue
                local = state[name]
                rows = local.shape[dim] * (size if pm.split in ("column", "vocab") else 1)
                if pm.parts is not None:
                    if rows != sum(pm.parts):
                        raise McoreError(
                            f"{name}: {rows} rows do not make the blocks {list(pm.parts)}"
                        )
                    # Every block is regrouped from the ranks' shares; HF has one tensor.
                    sizes, out_sizes = list(pm.parts), [rows]
                elif stacked:
                    sizes = out_sizes = [rows // len(hf_names)] * len(hf_names)
                else:
                    sizes = out_sizes = _part_sizes(model, name, len(hf_names), rows)
                full = _gather_shards(local, pm.split, sizes, group, size, dim)
                if not stacked:
                    _emit(tensors, pm, hf_names, full, out_sizes)
                    continue
                for e, expert in enumerate(_gather_experts(full, ps)):
                    _emit(tensors, pm, tuple(_fill(h, e=e) for h in hf_names), expert, out_sizes)
    return tensors


def default_architecture(model: GPTModel) -> str:
    """The architecture a model was loaded from, else Qwen3 for qk-norm models, else Llama.

    A multi-latent-attention or MoE model not loaded from HF has no obvious default: name its
    architecture instead (``DeepseekV3ForCausalLM``, ``MixtralForCausalLM``, ...).
    """
    name = getattr(model, "hf_architecture", None)
    if name:
        return name
    cfg, sections = model.config, model_sections(model)
    dense = all(gpt_layer_spec(cfg, i, sections).mlp == "mlp" for i in range(cfg.num_layers))
    if cfg.multi_latent_attention or cfg.hybrid_override_pattern or not dense:
        raise McoreError(
            "this model was not loaded from Hugging Face and is not a dense GQA model: pass "
            "architecture= (e.g. 'DeepseekV3ForCausalLM' or 'MixtralForCausalLM')"
        )
    return "Qwen3ForCausalLM" if cfg.qk_layernorm else "LlamaForCausalLM"


def save_hf(model: GPTModel, path: str | Path, architecture: str | None = None) -> None:
    """Write ``model`` as a HF directory (config.json + model.safetensors) at ``path``.

    ``architecture`` defaults to :func:`default_architecture`. Every rank must call this (the
    shards are gathered); only the first rank of the dense layout writes, each file under a
    temporary name and then renamed, so a reader never sees a half-written file.
    """
    from safetensors.torch import save_file

    architecture = architecture or default_architecture(model)
    hf_config = architecture_for(architecture).from_config(model.config, model_sections(model))
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
