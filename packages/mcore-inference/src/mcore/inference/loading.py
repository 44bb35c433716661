"""``load_model(path) -> (model, tokenizer)``: a Hugging Face directory or an mcore checkpoint.

The kind is detected from the directory:

- **Hugging Face**: ``config.json`` and ``*.safetensors`` files. The model comes from
  ``mcore.models.hf.load_hf`` (any architecture in the ``hf_architecture`` registry, MoE ones
  with mcore-moe installed), the tokenizer from ``tokenizer.json`` (:class:`HFTextTokenizer`),
  or None when the directory has none.
- **mcore checkpoint**: what ``mcore train`` writes to ``checkpoint.save``. The run's config
  (``config.toml`` in the directory, or the file given as ``config_file``) says how to build
  the model (``[model]``, plus sections such as ``[moe]``) and the tokenizer (``[data]``).
  The weights are read by the checkpoint format named in ``checkpoint.ckpt_format``, looked up
  in the ``checkpoint_format`` registry, so this package never imports mcore-ckpt: the entry is
  called with no arguments and the object it returns must have
  ``load_model(path, model) -> None`` (see :data:`CHECKPOINT_FORMAT_CONTRACT`). Directories of
  the training loop's interim per-rank files (``model_rank00000.pt``, written before mcore-ckpt's
  formats) are read directly when the run had one model replica per rank (no TP/PP).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch

from mcore.core import McoreError, get_plugin_manager
from mcore.inference.tokenizer import CoreTextTokenizer, HFTextTokenizer, TextTokenizer

ModelKind = Literal["hf", "mcore"]

CHECKPOINT_FORMAT_CONTRACT = """\
A `checkpoint_format` registry entry, called with no arguments, returns an object with
    load_model(path: str | pathlib.Path, model: torch.nn.Module) -> None
that finds the newest checkpoint under `path` (following a `latest` pointer when there is one)
and loads the model weights into `model` -- built by the caller from the run's config for its
own parallel layout -- resharding as needed; it raises naming any missing or unexpected
tensor. Only model weights are read (no optimizer state)."""


def detect_model_kind(path: str | Path) -> ModelKind:
    """``hf`` or ``mcore`` for a model directory; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise McoreError(f"--model {str(path)!r}: no such directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    markers = ("config.toml", "latest", "model_rank00000.pt")
    if any((path / m).exists() for m in markers) or any(path.glob("iter_*")):
        return "mcore"
    raise McoreError(
        f"--model {str(path)!r} is neither a Hugging Face model directory (config.json and "
        "*.safetensors) nor an mcore checkpoint (what `mcore train --checkpoint.save DIR` "
        "writes: config.toml with model_rank*.pt files or a `latest` pointer)"
    )


def load_model(
    path: str | Path, *, config_file: str | Path | None = None
) -> tuple[torch.nn.Module, TextTokenizer | None]:
    """The model (on the CPU, fp32, evaluation mode) and tokenizer of the directory ``path``.

    ``config_file`` names the run config of an mcore checkpoint that has no ``config.toml``.
    The tokenizer is None when a Hugging Face directory has no ``tokenizer.json``.
    """
    path = Path(path)
    kind = detect_model_kind(path)
    if kind == "hf":
        from mcore.models.hf import load_hf

        model = load_hf(path)
        tokenizer = HFTextTokenizer(path) if (path / "tokenizer.json").is_file() else None
        return model.eval(), tokenizer
    return _load_mcore(path, config_file)


def load_tokenizer(
    path: str | Path, *, config_file: str | Path | None = None
) -> TextTokenizer | None:
    """Only the tokenizer of a model directory (a front end that runs no model)."""
    path = Path(path)
    if detect_model_kind(path) == "hf":
        return HFTextTokenizer(path) if (path / "tokenizer.json").is_file() else None
    from mcore.core.data.tokenizer import build_tokenizer

    return CoreTextTokenizer(build_tokenizer(_run_config(path, config_file)))


def _run_config(path: Path, config_file: str | Path | None) -> Any:
    from mcore.core import load_config

    file = Path(config_file) if config_file is not None else path / "config.toml"
    if not file.is_file():
        raise McoreError(
            f"mcore checkpoint {str(path)!r} has no config.toml, which says how to build the "
            "model; pass the run's config file (mcore generate/serve --config FILE)"
        )
    return load_config(file)


def _load_mcore(path: Path, config_file: str | Path | None) -> tuple[torch.nn.Module, Any]:
    from mcore.core.data.tokenizer import build_tokenizer
    from mcore.parallel import ParallelState

    config = _run_config(path, config_file)
    tokenizer = build_tokenizer(config)
    interim = path / "model_rank00000.pt"
    state = _read_interim(path, config) if interim.is_file() else None
    model_config = config.model
    if model_config.vocab_size is None:
        if state is not None and "embedding.weight" in state:
            vocab = state["embedding.weight"].shape[0]
        else:  # as mcore train pads it: a multiple of 128 (and of TP)
            vocab = math.ceil(tokenizer.vocab_size / 128) * 128
        model_config = dataclasses.replace(model_config, vocab_size=vocab)
    registries = get_plugin_manager().registries
    build = registries.get("model", model_config.name)
    model = build(model_config, ParallelState(), sections=config)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise McoreError(
                f"{str(interim)!r} does not match the model its config.toml builds: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
    else:
        _load_with_format(path, config, model, registries)
    return model.eval(), CoreTextTokenizer(tokenizer)


def _read_interim(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """The interim per-rank files of the training loop: rank 0's holds the whole model when
    every rank was a data-parallel replica."""
    parallel = getattr(config, "parallel", None)
    layout = {
        name: getattr(parallel, name, 1)
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
            "expert_tensor_parallel_size",
        )
    }
    split = {k: v for k, v in layout.items() if v and v > 1}
    if split:
        raise McoreError(
            f"{str(path)!r} holds per-rank shards of a run with {split}; loading those for "
            "inference needs mcore-ckpt's resharding formats (pip install mcore-ckpt and save "
            "with --checkpoint.ckpt-format torch_dist)"
        )
    states = torch.load(path / "model_rank00000.pt", map_location="cpu", weights_only=True)
    if isinstance(states, list):  # one state dict per model chunk
        if len(states) != 1:
            raise McoreError(f"{str(path)!r} holds {len(states)} model chunks; expected one")
        states = states[0]
    return states


def _load_with_format(path: Path, config: Any, model: torch.nn.Module, registries: Any) -> None:
    name = config.checkpoint.ckpt_format
    formats = registries["checkpoint_format"]
    if name not in formats:
        raise McoreError(
            f"mcore checkpoint {str(path)!r} is in format {name!r} (checkpoint.ckpt_format), "
            f"and no installed plugin provides it (known: {formats.names() or 'none'}). "
            "Install mcore-ckpt (pip install mcore-ckpt), which registers the checkpoint formats."
        )
    fmt = formats.get(name)()
    loader = getattr(fmt, "load_model", None)
    if not callable(loader):
        raise McoreError(
            f"checkpoint format {name!r} ({type(fmt).__name__}) has no load_model(path, model); "
            f"mcore-inference expects:\n{CHECKPOINT_FORMAT_CONTRACT}"
        )
    loader(path, model)
