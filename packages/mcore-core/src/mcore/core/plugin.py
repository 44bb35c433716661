"""The core's own plugin: its config sections and CLI sub-commands."""

from __future__ import annotations

from mcore.core.commands import CONFIG, PLUGINS
from mcore.core.hookspecs import hookimpl
from mcore.core.registry import PluginRegistrar
from mcore.core.sections import CORE_SECTIONS


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    for name, section in CORE_SECTIONS.items():
        registry.add("config_section", name, section)
    registry.add("cli_command", "plugins", PLUGINS)
    registry.add("cli_command", "config", CONFIG)
