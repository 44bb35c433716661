"""mcore-parallel's plugin: config sections ([parallel], [ddp]), the ddp wrapper, optimizers and
the ``mcore plan`` command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mcore.core import CliCommand, Config, Lazy, PluginRegistrar, hookimpl
from mcore.parallel.config import ParallelConfig
from mcore.parallel.distributed.config import DDPConfig

if TYPE_CHECKING:
    from mcore.core.protocols import TrainingRuntime


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "parallel", ParallelConfig)
    registry.add("config_section", "ddp", DDPConfig)
    # Lazy: these import torch, which loading plugins must not.
    registry.add("data_parallel", "ddp", Lazy("mcore.parallel.distributed:wrap_ddp"))
    registry.add("optimizer", "adam", Lazy("mcore.parallel.optimizer:build_adam"))
    registry.add("optimizer", "sgd", Lazy("mcore.parallel.optimizer:build_sgd"))
    registry.add(
        "linear_backend", "torch", Lazy("mcore.parallel.tensor_parallel:torch_linear_backend")
    )
    registry.add(
        "cli_command",
        "plan",
        CliCommand(
            help="per-rank memory, communication and FLOPs of a run at N ranks, without running it",
            configure=_plan_configure,
            run=_plan_run,
        ),
    )


def _plan_configure(parser: Any) -> None:
    from mcore.parallel.plan.cli import configure

    configure(parser)


def _plan_run(args: Any) -> int:
    from mcore.parallel.plan.cli import run

    return run(args)


@hookimpl
def mcore_training_runtime(config: Config) -> TrainingRuntime:
    from mcore.parallel.training import MeshTrainingRuntime

    return MeshTrainingRuntime(config)
