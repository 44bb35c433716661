"""mcore-inference's plugin: the ``[inference]`` section, the ``generate`` and ``serve``
commands (their modules import torch only when a command runs) and the ``onednn_packed``
linear backend."""

from __future__ import annotations

from mcore.core import Lazy, PluginRegistrar, hookimpl
from mcore.inference.cli import GENERATE, SERVE
from mcore.inference.config import InferenceConfig


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "inference", InferenceConfig)
    registry.add("cli_command", "generate", GENERATE)
    registry.add("cli_command", "serve", SERVE)
    registry.add(
        "linear_backend", "onednn_packed", Lazy("mcore.inference.packed_linears:onednn_packed")
    )
