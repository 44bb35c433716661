"""``load_model(path) -> (model, tokenizer)``: a Hugging Face directory or an mcore checkpoint.

The kind is detected from the directory:

- **Hugging Face**: ``config.json`` and ``*.safetensors`` files. The model comes from
  ``mcore.models.hf.load_hf`` (any architecture in the ``hf_architecture`` registry, MoE ones
  with mcore-moe installed), the tokenizer from ``tokenizer.json`` (:class:`HFTextTokenizer`),
  or None when the directory has none.
- **mcore checkpoint**: what ``mcore train`` saves: a save directory whose ``latest`` names
  the newest ``iter_*`` folder, or one such folder itself (it holds ``common.json``). Its
  ``common.json`` carries the run config (``config``), the model's own config (``model``,
  with the padded vocabulary) and the ``format``. The model is built from those through the
  ``model`` registry; the tokenizer is the one shipped in the folder (``tokenizer.json``, as
  ``mcore ckpt import-hf`` copies it), else the run's ``[data]`` tokenizer; the weights are read
  by the format's entry in the ``checkpoint_format`` registry, so this package never imports
  mcore-ckpt (see :data:`CHECKPOINT_FORMAT_CONTRACT`).

``config_file`` (``--run-config``) gives the run config when the checkpoint lacks one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch

from mcore.core import McoreError, get_plugin_manager
from mcore.inference.tokenizer import CoreTextTokenizer, HFTextTokenizer, TextTokenizer

ModelKind = Literal["hf", "mcore"]
COMMON = "common.json"
LATEST = "latest"

CHECKPOINT_FORMAT_CONTRACT = """\
The `checkpoint_format` registry entry named by common.json's `format` (the entry itself, or
what calling it with no arguments returns, when it is a class or factory) has either
    load_model(folder: pathlib.Path, model: torch.nn.Module) -> None
(preferred: model weights only, into a model the caller built for its own layout, resharding
as needed, raising on missing or unexpected tensors), or the training loop's
    load(folder, [model], None, group=None, common=<common.json as a dict>) -> None
where `folder` is the iter_* folder holding common.json."""


def detect_model_kind(path: str | Path) -> ModelKind:
    """``hf`` or ``mcore`` for a model directory; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise McoreError(f"--model {str(path)!r}: no such directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if any((path / marker).is_file() for marker in (COMMON, LATEST)):
        return "mcore"
    raise McoreError(
        f"--model {str(path)!r} is neither a Hugging Face model directory (config.json and "
        "*.safetensors) nor an mcore checkpoint (what `mcore train --checkpoint.save DIR` "
        f"writes: a `{LATEST}` pointer to iter_* folders holding {COMMON})"
    )


def load_model(
    path: str | Path,
    *,
    config_file: str | Path | None = None,
    parallel_state: Any = None,
) -> tuple[torch.nn.Module, TextTokenizer | None]:
    """The model (on the CPU, fp32, evaluation mode) and tokenizer of the directory ``path``.

    ``parallel_state`` (a ``mcore.parallel.ParallelState``): this rank's shard of a model split
    over tensor-parallel ranks; each rank reads only its own slices. The tokenizer is None when
    a Hugging Face directory has no ``tokenizer.json``.
    """
    path = Path(path)
    _check_inference_layout(parallel_state)
    if detect_model_kind(path) == "hf":
        from mcore.models.hf import load_hf

        model = load_hf(path, parallel_state)
        return model.eval(), load_tokenizer(path)
    return _load_mcore(path, config_file, parallel_state)


def _check_inference_layout(ps: Any) -> None:
    """The engine runs models split over TP, PP stages (and experts over EP); not CP."""
    if ps is None:
        return
    refused = {"context": ps.cp_size}
    for kind, size in refused.items():
        if size > 1:
            raise McoreError(
                f"the inference engine does not run {kind} parallelism yet ({kind} size "
                f"{size}): load the model with {kind} size 1"
            )


# What a tensor-parallel engine splits: (section, field) -> what it is, for the error message.
_TP_SPLIT = {
    ("model", "num_attention_heads"): "attention heads",
    ("model", "num_query_groups"): "key/value heads",
    ("model", "vocab_size"): "vocabulary rows",
    ("model", "ffn_hidden_size"): "MLP width",
    ("moe", "ffn_hidden_size"): "expert MLP width",
    ("moe", "shared_expert_intermediate_size"): "shared expert MLP width",
    ("ssm", "mamba_num_heads"): "Mamba heads",
    ("ssm", "mamba_num_groups"): "Mamba groups",
    ("ssm", "linear_num_key_heads"): "gated delta net key heads",
    ("ssm", "linear_num_value_heads"): "gated delta net value heads",
}


def check_layout(
    path: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    config_file: str | Path | None = None,
) -> None:
    """Refuse ``tp`` (``inference.tensor_model_parallel_size``) when it does not divide what
    the model at ``path`` splits over tensor-parallel ranks, and ``pp``
    (``inference.pipeline_model_parallel_size``) when the model has fewer layers than stages,
    and ``ep`` (``inference.expert_model_parallel_size``) when it does not divide the experts,
    naming the fields and the numbers; cheap (reads only the config), so a server checks
    before it starts any process. Uneven stage splits are the model builder's to refuse."""
    if tp == 1 and pp == 1 and ep == 1:
        return
    path = Path(path)
    if detect_model_kind(path) == "hf":
        from mcore.models.hf import read_hf_config

        _, model, sections = read_hf_config(path)
    else:
        _, common = _checkpoint(path)
        sections = _run_config(path, common, config_file)
        model = sections.model
    moe = _section(sections, "moe")
    experts = getattr(moe, "num_experts", None)
    if ep > 1 and not experts:
        raise McoreError(
            f"inference.expert_model_parallel_size = {ep}, but the model has no experts "
            "(moe.num_experts is unset) to split over expert-parallel ranks"
        )
    if ep > 1 and experts and experts % ep:
        raise McoreError(
            f"inference.expert_model_parallel_size = {ep} does not divide the model's "
            f"moe.num_experts = {experts}"
        )
    if model.num_layers < pp:
        raise McoreError(
            f"inference.pipeline_model_parallel_size = {pp} is more stages than the model's "
            f"model.num_layers = {model.num_layers}"
        )
    problems = []
    for (section, name), what in _TP_SPLIT.items():
        owner = model if section == "model" else _section(sections, section)
        value = getattr(owner, name, None)
        if tp > 1 and isinstance(value, int) and value % tp:
            problems.append(f"{section}.{name} = {value} ({what})")
    if problems:
        raise McoreError(
            f"inference.tensor_model_parallel_size = {tp} does not divide the model's "
            + "; ".join(problems)
        )


def _section(sections: Any, name: str) -> Any:
    return sections.get(name) if isinstance(sections, dict) else getattr(sections, name, None)


def load_tokenizer(
    path: str | Path, *, config_file: str | Path | None = None
) -> TextTokenizer | None:
    """Only the tokenizer of a model directory (for a front end that runs no model)."""
    path = Path(path)
    if detect_model_kind(path) == "hf":
        return HFTextTokenizer(path) if (path / "tokenizer.json").is_file() else None
    folder, common = _checkpoint(path)
    return _checkpoint_tokenizer(folder, _run_config(path, common, config_file))


# -- mcore checkpoints -----------------------------------------------------------------------


def _checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The ``iter_*`` folder to load from and its ``common.json``."""
    if (path / COMMON).is_file():
        return path, _read_common(path)
    name = (path / LATEST).read_text().strip() if (path / LATEST).is_file() else ""
    folder = path / name
    if not name or not (folder / COMMON).is_file():
        raise McoreError(
            f"{str(path / LATEST)!r} names {name[:60]!r}, which is not a complete checkpoint "
            f"in {str(path)!r} (no {COMMON})"
        )
    return folder, _read_common(folder)


def _read_common(folder: Path) -> dict[str, Any]:
    try:
        common = json.loads((folder / COMMON).read_text())
    except (OSError, ValueError) as exc:
        raise McoreError(f"{str(folder / COMMON)!r} cannot be read: {exc}") from exc
    if not isinstance(common, dict):
        raise McoreError(f"{str(folder / COMMON)!r} is not an mcore checkpoint record")
    return common


def _run_config(path: Path, common: dict[str, Any], config_file: str | Path | None) -> Any:
    """The run's config: ``config_file``, else the checkpoint's own record of it."""
    from mcore.core import load_config
    from mcore.core.config import build_config, config_sections

    if config_file is not None:
        return load_config(config_file)
    if not isinstance(common.get("config"), dict):
        raise McoreError(
            f"mcore checkpoint {str(path)!r} records no run config ('config' in {COMMON}), "
            "which says how to build the model; pass the run's config file "
            "(mcore generate/serve --run-config FILE)"
        )
    sections = config_sections()
    # Sections of plugins not installed here are left out; a model that needs one fails to
    # build with the registry's "install ..." message.
    values = {k: v for k, v in common["config"].items() if k in sections}
    if isinstance(common.get("model"), dict) and common["model"]:
        values["model"] = common["model"]  # the model as built (padded vocabulary)
    values = {k: {f: x for f, x in v.items() if x is not None} for k, v in values.items()}
    return build_config(values, sections)


def _load_mcore(
    path: Path, config_file: str | Path | None, parallel_state: Any = None
) -> tuple[torch.nn.Module, TextTokenizer]:
    from mcore.parallel import ParallelState
    from mcore.parallel.init import materialize

    folder, common = _checkpoint(path)
    config = _run_config(path, common, config_file)
    tokenizer = _checkpoint_tokenizer(folder, config)
    model_config = config.model
    if model_config.vocab_size is None:  # as mcore train pads it: a multiple of 128
        vocab = math.ceil(tokenizer.vocab_size / 128) * 128
        model_config = dataclasses.replace(model_config, vocab_size=vocab)
    registries = get_plugin_manager().registries
    build = registries.get("model", model_config.name)
    device = torch.get_default_device()
    with torch.device("meta"):  # every weight is about to be read: draw none
        model = build(model_config, parallel_state or ParallelState(), sections=config)
    materialize(model, device=device, seed=getattr(model, "init_seed", 0), initialize=False)
    model = model.to(device)  # derived buffers (rotary frequencies) are built on the CPU
    _load_with_format(folder, common, model, registries)
    return model.eval(), tokenizer


def _checkpoint_tokenizer(folder: Path, config: Any) -> TextTokenizer:
    """Tokenizer files shipped in the checkpoint folder (``mcore ckpt import-hf`` copies
    them), else the run's ``[data]`` tokenizer."""
    if (folder / "tokenizer.json").is_file():
        return HFTextTokenizer(folder)
    from mcore.core.data.tokenizer import build_tokenizer

    return CoreTextTokenizer(build_tokenizer(config))


def _builds_format(entry: object) -> bool:
    """Whether a ``checkpoint_format`` entry is a class or factory of the format rather than
    the format itself."""
    loads = hasattr(entry, "load_model") or hasattr(entry, "load")
    return isinstance(entry, type) or (callable(entry) and not loads)


def _load_with_format(
    folder: Path, common: dict[str, Any], model: torch.nn.Module, registries: Any
) -> None:
    name = common.get("format")
    formats = registries["checkpoint_format"]
    if not isinstance(name, str) or name not in formats:
        raise McoreError(
            f"mcore checkpoint {str(folder)!r} is in format {name!r} ({COMMON}), and no "
            f"installed plugin provides it (known: {', '.join(formats.names()) or 'none'}). "
            "Install mcore-ckpt (pip install mcore-ckpt), which registers the checkpoint formats."
        )
    fmt: Any = formats.get(name)
    if _builds_format(fmt):
        fmt = fmt()  # a class or factory
    if callable(getattr(fmt, "load_model", None)):
        fmt.load_model(folder, model)
    elif callable(getattr(fmt, "load", None)):
        fmt.load(folder, [model], None, group=None, common=common)
    else:
        raise McoreError(
            f"checkpoint format {name!r} ({type(fmt).__name__}) cannot load a model for "
            f"inference; mcore-inference expects:\n{CHECKPOINT_FORMAT_CONTRACT}"
        )
