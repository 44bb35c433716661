"""mcore-distill's plugin: knowledge distillation built only on mcore's plugin hooks.

- ``mcore_register``: the ``[kd]`` section;
- ``mcore_validate_config``: layouts distillation does not support yet, refused up front;
- ``mcore_on_model_built``: read the teacher for this rank's stage, check it against the
  student (vocabulary, layer pairs), add the layer pairs' projections to the student and put
  each student chunk in a :class:`~mcore.distill.stage.DistillationStage`;
- ``mcore_loss_terms``: the logits KL and the layer-pair losses of a micro-batch, weighed as
  ``[kd]`` says;
- ``mcore_plan_models``: the teacher, for ``mcore plan``'s memory table.

Torch is imported inside the hooks, so loading the plugin stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mcore.core import ConfigErrors, McoreError, PluginRegistrar, hookimpl
from mcore.distill.config import KDConfig

NAME = "mcore-distill"


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "kd", KDConfig)


@hookimpl
def mcore_validate_config(config: Any, errors: ConfigErrors) -> None:
    if "kd" not in config or not config.kd.enabled:
        return
    parallel = config.parallel
    if parallel.context_parallel_size > 1:
        errors.add("kd.teacher_load", "distillation does not support parallel.cp > 1 yet")
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp and vpp > 1:
        errors.add(
            "kd.teacher_load",
            "distillation does not support virtual pipeline stages yet "
            f"(parallel.virtual_pipeline_model_parallel_size = {vpp})",
        )


@hookimpl
def mcore_on_model_built(trainer: Any, chunks: list) -> None:
    kd = trainer.config.kd if "kd" in trainer.config else None
    if kd is None or not kd.enabled:
        return
    if trainer.command != "train":
        raise McoreError(
            f"kd.teacher_load is set, but mcore {trainer.command} does not distil: "
            "distillation runs under mcore train"
        )
    from mcore.distill.distiller import Distiller

    distiller = Distiller.build(trainer, kd, chunks)
    trainer.state[NAME] = distiller
    if kd.skip_lm_loss:
        trainer.lm_loss_weight = 0.0


@hookimpl
def mcore_loss_terms(trainer: Any, model: Any, batch: dict, lm_loss: Any) -> dict | None:
    distiller = trainer.state.get(NAME)
    if distiller is None:
        return None
    return distiller.loss_terms(model, batch, lm_loss)


@hookimpl
def mcore_plan_frozen_models(config: Any) -> list | None:
    kd = config.kd if "kd" in config else None
    if kd is None or not kd.enabled:
        return None
    import torch

    from mcore.core import get_plugin_manager
    from mcore.distill.teacher import reading_teacher, teacher_spec

    with reading_teacher(Path(kd.teacher_load)):
        run, model_config = teacher_spec(config, get_plugin_manager())
    dtype = torch.bfloat16 if kd.teacher_bf16 else torch.float32
    return [("teacher", run, model_config, dtype)]
