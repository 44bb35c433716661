"""mcore-parallel's plugin: its config section (layers and wrappers register here as they land)."""

from __future__ import annotations

from mcore.core import PluginRegistrar, hookimpl
from mcore.parallel.config import ParallelConfig


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "parallel", ParallelConfig)
