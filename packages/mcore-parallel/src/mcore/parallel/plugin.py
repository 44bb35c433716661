"""mcore-parallel's plugin: config sections ([parallel], [ddp]), the ddp wrapper and optimizers."""

from __future__ import annotations

from typing import Any

from mcore.core import Lazy, PluginRegistrar, hookimpl
from mcore.parallel.config import ParallelConfig
from mcore.parallel.distributed.config import DDPConfig


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "parallel", ParallelConfig)
    registry.add("config_section", "ddp", DDPConfig)
    # Lazy: these import torch, which loading plugins must not.
    registry.add("data_parallel", "ddp", Lazy("mcore.parallel.distributed:wrap_ddp"))
    registry.add("optimizer", "adam", Lazy("mcore.parallel.optimizer:build_adam"))
    registry.add("optimizer", "sgd", Lazy("mcore.parallel.optimizer:build_sgd"))


@hookimpl
def mcore_training_runtime(config: Any) -> Any:
    from mcore.parallel.training import MeshTrainingRuntime

    return MeshTrainingRuntime(config)
