"""``mcore ckpt``: inspect, convert, import and export checkpoints, on one process.

``inspect`` reads only metadata. ``convert``, ``import-hf`` and ``export-hf`` hold the whole
model in this process's memory (CPU), which suits the models one converts offline; training
itself never does.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from mcore.ckpt import directory
from mcore.ckpt.errors import CheckpointingException

# Only the argument parser is built at import (``mcore --help`` lists every command): what
# needs torch is imported by the actions that use it.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="format, layout and tensors of a checkpoint")
    inspect.add_argument("path", help="a save directory (its latest) or one checkpoint folder")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    inspect.add_argument(
        "--verify", action="store_true", help="also check every shard file's size and CRC-32"
    )
    convert = sub.add_parser("convert", help="rewrite a checkpoint in another format")
    convert.add_argument("src", help="checkpoint to read")
    convert.add_argument("dst", help="save directory to write (gets iter_N/ and latest)")
    convert.add_argument("--format", required=True, help="torch_dist, fsdp_dtensor or hf")
    imp = sub.add_parser("import-hf", help="a Hugging Face model folder as an mcore checkpoint")
    imp.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    imp.add_argument("out", help="save directory to write (gets iter_0000000/ and latest)")
    exp = sub.add_parser("export-hf", help="an mcore checkpoint as a Hugging Face model folder")
    exp.add_argument("ckpt", help="checkpoint to read")
    exp.add_argument("out", help="folder to write config.json and model.safetensors into")
    exp.add_argument("--architecture", default=None, help="HF architecture (default: inferred)")


def run(args: argparse.Namespace) -> int:
    command = args.ckpt_command
    if command == "inspect":
        return inspect(Path(args.path), as_json=args.json, verify=args.verify)
    if command == "convert":
        convert(Path(args.src), Path(args.dst), args.format)
    elif command == "import-hf":
        import_hf(Path(args.hf_dir), Path(args.out))
    elif command == "export-hf":
        export_hf(Path(args.ckpt), Path(args.out), architecture=args.architecture)
    return 0


# -- inspect ------------------------------------------------------------------------------------


def describe(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """What ``inspect --json`` prints."""
    folder = directory.resolve(path)  # a missing checkpoint fails before torch imports
    from mcore.ckpt import dcp_io
    from mcore.ckpt.checkpointer import read_common

    common = read_common(folder)
    from mcore.ckpt.formats import get_format

    fmt = get_format(common["format"])
    if verify and not fmt.weights_only:
        dcp_io.check_files(folder, dcp_io.read_metadata(folder), common.get("files"))
    tensors = fmt.describe(folder)
    return {
        "path": str(folder),
        "format": common["format"],
        "iteration": common.get("iteration", 0),
        "consumed_samples": common.get("consumed_samples", 0),
        "layout": common.get("layout", {}),
        "model": common.get("model", {}),
        "total_bytes": sum(t["bytes"] or 0 for t in tensors),
        "tensors": tensors,
        "verified": bool(verify),
    }


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return str(size)


def inspect(path: Path, *, as_json: bool, verify: bool) -> int:
    info = describe(path, verify=verify)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    layout = info["layout"]
    shown = ", ".join(f"{k.removesuffix('_size')}={v}" for k, v in layout.items() if v is not None)
    print(f"checkpoint: {info['path']}")
    print(f"format:     {info['format']}  (step {info['iteration']})")
    print(f"layout:     {shown or 'unknown'}")
    model = info["model"]
    if model:
        keys = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
        print("model:      " + ", ".join(f"{k}={model[k]}" for k in keys if k in model))
    print(f"size:       {_size(info['total_bytes'])} in {len(info['tensors'])} tensors")
    if verify:
        print("verified:   every shard file has the size and CRC-32 it was written with")
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in info["tensors"]:
        groups.setdefault(t["key"].split(".", 1)[0], []).append(t)
    for group, items in groups.items():
        print(f"\n{group}/  ({_size(sum(t['bytes'] or 0 for t in items))})")
        width = max(len(t["key"]) for t in items) - len(group) - 1
        for t in items:
            shape = "x".join(map(str, t["shape"])) if t["shape"] is not None else "-"
            print(f"  {t['key'][len(group) + 1 :]:<{width}}  {shape:>16}  {t['dtype']:<9} "
                  f"{_size(t['bytes']):>10}")  # fmt: skip
    return 0


# -- whole-model helpers (one process) ----------------------------------------------------------


def _read_all(folder: Path) -> dict[str, Any]:
    """Every stored tensor of a DCP checkpoint, whole, in memory."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from mcore.ckpt import dcp_io
    from mcore.ckpt.checkpointer import read_common

    metadata = dcp_io.read_metadata(folder)
    common = read_common(folder)
    dcp_io.check_files(folder, metadata, common.get("files"))
    tensors = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):  # not bytes (a megatron_fsdp param_groups)
            tensors[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp_io.read(folder, tensors, group=None, metadata=metadata)
    return tensors


def _write_checkpoint(out: Path, tensors: dict[str, Any], common: dict[str, Any]) -> Path:
    """Publish ``tensors`` (whole tensors, or pieces) as ``out/iter_N`` with ``latest``."""
    import torch

    from mcore.ckpt import dcp_io
    from mcore.ckpt.checkpointer import VERSION, write_checkpoint
    from mcore.parallel.sharding import ShardedTensor

    sharded: dict[str, Any] = {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            sharded[key] = ShardedTensor(key, tuple(value.shape), value.dtype,
                                         [(value, (0,) * value.dim())])  # fmt: skip
        else:
            sharded[key] = value
    out.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint(
        out,
        int(common.get("iteration", 0)),
        lambda folder: dcp_io.write(folder, sharded, group=None),
        {**common, "version": VERSION},
        group=None,
    )
    return Path(path)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def convert(src: Path, dst: Path, fmt_name: str) -> Path:
    """Rewrite ``src`` in format ``fmt_name`` under the save directory ``dst``."""
    from mcore.ckpt.checkpointer import read_common
    from mcore.ckpt.formats import get_format

    target = get_format(fmt_name)
    folder = directory.resolve(src)
    common = read_common(folder)
    if target.weights_only:
        return export_hf(folder, dst)
    if common["format"] == "hf":
        raise CheckpointingException(
            f"{str(folder)!r} is a Hugging Face folder: use mcore ckpt import-hf"
        )
    tensors = _read_all(folder)
    if not getattr(target, "rng", True):  # a DCPFormat that stores no random generators
        tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    final = _write_checkpoint(dst, tensors, {**common, "format": target.name})
    _copy_tokenizer(folder, final)
    print(f"converted {folder} ({common['format']}) -> {final} ({target.name})")
    return final


def _build_model(common: dict[str, Any]) -> Any:
    """A single-process model of the config a checkpoint was saved with."""
    try:
        from mcore.models import GPTModel, TransformerConfig
    except ImportError:
        raise CheckpointingException(
            "building the model needs mcore-models: pip install mcore-models"
        ) from None
    from mcore.core import get_plugin_manager
    from mcore.core.config import build_config, config_sections

    if not common.get("model"):
        raise CheckpointingException("the checkpoint records no model config to build from")
    config = TransformerConfig(**common["model"])
    sections = config_sections(get_plugin_manager())
    saved = {k: v for k, v in (common.get("config") or {}).items() if k in sections}
    return GPTModel(config, sections=build_config(saved, sections))


def _hf(command: str) -> Any:
    """``mcore.models.hf``, or an error saying the command needs mcore-models."""
    try:
        import mcore.models.hf as hf
    except ImportError:
        raise CheckpointingException(
            f"{command} needs mcore-models: pip install mcore-models"
        ) from None
    return hf


def import_hf(hf_dir: Path, out: Path) -> Path:
    """``hf_dir`` (config.json + safetensors) as an mcore checkpoint: weights, step 0."""

    import dataclasses

    from mcore.ckpt.state import model_tensors

    model = _hf("import-hf").load_hf(hf_dir)
    tensors = model_tensors([model], for_save=True)
    sections = {name: dataclasses.asdict(obj) for name, obj in model.sections.items()}
    common = {
        "format": "torch_dist",
        "iteration": 0,
        "consumed_samples": 0,
        "model": json.loads(json.dumps(dataclasses.asdict(model.config), default=str)),
        "config": json.loads(json.dumps(sections, default=str)),
        "layout": {"world_size": 1},
        "imported_from": str(hf_dir),
        "hf_architecture": model.hf_architecture,
    }
    final = _write_checkpoint(out, tensors, common)
    _copy_tokenizer(hf_dir, final)
    print(f"imported {hf_dir} -> {final}")
    return final


def export_hf(ckpt: Path, out: Path, architecture: str | None = None) -> Path:
    """The weights of checkpoint ``ckpt`` as a Hugging Face folder ``out``, in ``architecture``
    (default: the one the checkpoint was imported from, else inferred from the model)."""
    from mcore.ckpt.checkpointer import read_common
    from mcore.ckpt.formats import get_format

    folder = directory.resolve(ckpt)
    common = read_common(folder)
    save_hf = _hf("export-hf").save_hf
    model = _build_model(common)
    get_format(common["format"]).load_model(folder, model)
    save_hf(model, out, architecture=architecture or common.get("hf_architecture"))
    _copy_tokenizer(folder, out)
    print(f"exported {folder} -> {out}")
    return out
