"""The teacher: read from an mcore checkpoint or a Hugging Face directory, built for this rank
in the student's layout (its own layers split over the same pipeline stages, its matrices over
the same TP ranks, its experts over the same EP ranks), frozen, in eval mode.

Each rank builds its stage on ``meta`` and reads only its own shards; no rank holds the whole
teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mcore.core import McoreError
from mcore.core.config import Config, ConfigError, build_config, config_sections


def load_teacher(trainer: Any, kd: Any) -> torch.nn.Module:
    """This rank's stage of the teacher ``kd.teacher_load``, frozen, on the training device."""
    path = Path(kd.teacher_load)
    device = getattr(trainer.runtime, "device", torch.device("cpu"))
    with reading_teacher(path):
        if (path / "config.json").is_file():
            teacher = _hf_teacher(trainer, kd, path)
        else:
            teacher = _mcore_teacher(trainer, kd, path)
    teacher = teacher.to(device)
    if kd.teacher_bf16:
        teacher = teacher.to(torch.bfloat16)
    teacher.requires_grad_(False)
    return teacher.eval()


@contextlib.contextmanager
def reading_teacher(path: Path) -> Iterator[None]:
    """Errors while reading the teacher at ``path`` as one naming ``kd.teacher_load``."""
    if not path.exists():
        raise McoreError(f"kd.teacher_load: {str(path)!r} does not exist")
    try:
        yield
    except McoreError as exc:
        if str(exc).startswith("kd."):
            raise
        raise McoreError(f"kd.teacher_load: cannot read the teacher {str(path)!r}: {exc}") from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise McoreError(
            f"kd.teacher_load: cannot read the teacher {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _overridden(model_config: Any, kd: Any) -> Any:
    """The teacher's model config with ``kd.teacher_model``'s fields changed."""
    known = {f.name for f in dataclasses.fields(model_config)}
    unknown = sorted(set(kd.teacher_model) - known)
    if unknown:
        raise McoreError(
            f"kd.teacher_model: {unknown} are not fields of the teacher's [model] section "
            f"({type(model_config).__name__})"
        )
    if not kd.teacher_model:
        return model_config
    return dataclasses.replace(model_config, **kd.teacher_model)


def _hf_teacher(trainer: Any, kd: Any, path: Path) -> torch.nn.Module:
    from mcore.models.hf import load_hf

    return load_hf(
        path,
        trainer.parallel_state,
        config_overrides=dict(kd.teacher_model) or None,
        sequence_parallel=trainer.config.parallel.sequence_parallel,
    )


def _mcore_teacher(trainer: Any, kd: Any, path: Path) -> torch.nn.Module:
    from mcore.ckpt import get_format, read_common, resolve
    from mcore.parallel.init import materialize
    from mcore.parallel.training import build_meta_chunks

    folder = resolve(path)
    common = read_common(folder)
    if common.get("format") == "hf":  # saved with checkpoint.ckpt_format = 'hf'
        return _hf_teacher(trainer, kd, folder)
    config, model_config = _saved_spec(trainer.config, kd, common, folder, trainer.manager)
    (teacher,) = build_meta_chunks(config, model_config, trainer.registries, trainer.parallel_state)
    device = getattr(trainer.runtime, "device", torch.device("cpu"))
    materialize(teacher, device=device, seed=0, initialize=False)
    get_format(common["format"]).load_model(folder, teacher)
    return teacher


def teacher_spec(config: Any, manager: Any) -> tuple[Any, Any]:
    """``(run config, model config)`` the teacher of ``config.kd`` is built from, read from its
    checkpoint's config without its weights (what ``mcore plan`` measures)."""
    kd, path = config.kd, Path(config.kd.teacher_load)
    if (path / "config.json").is_file():
        from mcore.models.hf import read_hf_config

        _, model_config, sections = read_hf_config(path)
        run = {name: config[name] for name in config.section_names()}
        return Config({**run, **sections}), _overridden(model_config, kd)
    from mcore.ckpt import read_common, resolve

    folder = resolve(path)
    common = read_common(folder)
    if common.get("format") == "hf":
        return teacher_spec(_with_kd(config, teacher_load=str(folder)), manager)
    return _saved_spec(config, kd, common, folder, manager)


def _with_kd(config: Any, **changes: Any) -> Any:
    sections = {name: config[name] for name in config.section_names()}
    sections["kd"] = dataclasses.replace(config.kd, **changes)
    return Config(sections)


def _saved_spec(
    config: Any, kd: Any, common: dict[str, Any], folder: Path, manager: Any
) -> tuple[Any, Any]:
    saved_model, saved = common.get("model"), common.get("config")
    if not saved_model or not saved:
        raise McoreError(f"kd.teacher_load: {str(folder)!r} records no model config")
    run = _teacher_config(config, saved, manager)
    return run, _overridden(type(config.model)(**saved_model), kd)


def _teacher_config(config: Any, saved: dict[str, Any], manager: Any) -> Any:
    """The run config the teacher is built from: the sections its checkpoint saved (model, moe,
    hybrid...) with the student's layout and training device ([parallel], [train])."""
    sections = config_sections(manager)
    values = {name: table for name, table in saved.items() if name in sections}
    current = config.to_dict()
    for name in ("parallel", "train"):
        values[name] = current[name]
    values.pop("kd", None)  # the teacher's own distillation, if it had one, does not matter
    try:
        return build_config(values, sections)
    except ConfigError as exc:
        raise McoreError(
            f"kd.teacher_load: the teacher's saved config does not fit this install: {exc}"
        ) from None
