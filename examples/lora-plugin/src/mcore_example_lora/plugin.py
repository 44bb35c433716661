"""The plugin module named by the ``mcore`` entry point in this package's pyproject.toml.

mcore imports it when it loads plugins and calls every ``@hookimpl`` function in it that is named
after a hook in :mod:`mcore.core.hookspecs`. Only the config section is imported here; the
torch code (:mod:`mcore_example_lora.lora`) is imported when a run builds its model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mcore.core import Config, ConfigErrors, McoreError, PluginRegistrar, hookimpl
from mcore_example_lora.config import LoRAConfig

if TYPE_CHECKING:
    import torch

    from mcore.core.training.trainer import Trainer

NAME = "example-lora"
"""The entry point's name: this plugin's key in ``trainer.state``."""


def _lora(config: Config) -> LoRAConfig | None:
    """The ``[lora]`` section when it switches LoRA on, else ``None``."""
    section = getattr(config, "lora", None)
    return section if section is not None and section.rank > 0 else None


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    # `--lora.rank 8` on the command line, or `[lora] rank = 8` in a TOML config.
    registry.add("config_section", "lora", LoRAConfig)


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    if _lora(config) is None or "train" not in config:
        return
    wrapper = config.train.data_parallel
    if wrapper != "ddp":
        errors.add(
            "lora.rank",
            f"the example LoRA plugin runs with train.data_parallel = 'ddp' only (got "
            f"{wrapper!r}): set lora.rank = 0 or use ddp",
        )


@hookimpl
def mcore_on_model_built(trainer: Trainer, chunks: list[torch.nn.Module]) -> None:
    lora = _lora(trainer.config)
    if lora is None:
        return
    if trainer.command != "train":
        raise McoreError(
            f"lora.rank = {lora.rank}: the example LoRA plugin adapts `mcore train` runs only; "
            f"`mcore {trainer.command}` builds models the adapters are not added to"
        )
    from mcore_example_lora.lora import add_lora

    adapters = add_lora(chunks, rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
    trainer.state[NAME] = {"layers": len(adapters)}


@hookimpl
def mcore_step_metrics(trainer: Trainer, step: int) -> dict[str, Any] | None:
    if NAME not in trainer.state or not trainer.logger.should_log(step):
        return None
    from mcore_example_lora.lora import adapters_of, b_norm

    chunks = trainer.chunks
    device = next(chunks[0].parameters()).device
    return {"lora/b_norm": b_norm(adapters_of(chunks), trainer.parallel_state, device)}
