"""mcore-inference's plugin: the ``[inference]`` section and the ``generate`` and ``serve``
commands (their modules import torch only when a command runs)."""

from __future__ import annotations

from mcore.core import PluginRegistrar, hookimpl
from mcore.inference.cli import GENERATE, SERVE
from mcore.inference.config import InferenceConfig


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "inference", InferenceConfig)
    registry.add("cli_command", "generate", GENERATE)
    registry.add("cli_command", "serve", SERVE)
