"""megatron-rl's plugin: the ``[rl]`` section; environments and agents join as they land."""

from __future__ import annotations

from mcore.core import PluginRegistrar, hookimpl
from megatron_rl.config import RLConfig


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "rl", RLConfig)
