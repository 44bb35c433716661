"""mcore-ckpt's plugin: the checkpoint formats, ``mcore train``'s checkpointer, ``mcore ckpt``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mcore.core import CliCommand, Config, ConfigErrors, Lazy, PluginRegistrar, hookimpl

if TYPE_CHECKING:
    from mcore.core.protocols import Checkpointer, TrainingRuntime

# Formats Megatron-LM once offered that mcore does not carry, with what to use instead.
RETIRED_FORMATS = {
    "zarr": "torch_dist",
    "torch": "torch_dist",
}


def _ckpt_configure(parser: Any) -> None:
    from mcore.ckpt.cli import configure

    configure(parser)


def _ckpt_run(args: Any) -> int:
    from mcore.ckpt.cli import run

    return run(args)


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    # Lazy: the formats import torch, which loading plugins must not.
    registry.add("checkpoint_format", "torch_dist", Lazy("mcore.ckpt.formats:TORCH_DIST"))
    registry.add("checkpoint_format", "fsdp_dtensor", Lazy("mcore.ckpt.formats:FSDP_DTENSOR"))
    registry.add("checkpoint_format", "hf", Lazy("mcore.ckpt.formats:HF"))
    registry.add(
        "cli_command",
        "ckpt",
        CliCommand(
            help="inspect, convert, import and export checkpoints",
            configure=_ckpt_configure,
            run=_ckpt_run,
        ),
    )


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    ckpt = config.checkpoint
    fmt = ckpt.ckpt_format
    if fmt in RETIRED_FORMATS:
        errors.add(
            "checkpoint.ckpt_format",
            f"{fmt!r} is not supported; use {RETIRED_FORMATS[fmt]!r} (sharded, resharding on load)",
        )
    if fmt == "hf" and ckpt.async_save:
        errors.add(
            "checkpoint.async_save",
            "the 'hf' format writes synchronously; use ckpt_format torch_dist for async saves",
        )


@hookimpl
def mcore_checkpointer(config: Config, runtime: TrainingRuntime) -> Checkpointer:
    from mcore.ckpt.checkpointer import Checkpointer as MCoreCheckpointer

    return MCoreCheckpointer(config, runtime)
