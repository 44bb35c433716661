"""mcore-inference's plugin: the ``[inference]`` section (generate/serve arrive with the engine)."""

from __future__ import annotations

from mcore.core import PluginRegistrar, hookimpl
from mcore.inference.config import InferenceConfig


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "inference", InferenceConfig)
