"""mcore.core: the plugin manager, typed registries, configuration and the ``mcore`` CLI.

The plugin API in one screen (see the package README for more)::

    from mcore.core import hookimpl

    @hookimpl
    def mcore_register(registry):
        registry.add("router", "my_router", MyRouter)
"""

from __future__ import annotations

import importlib.metadata as _md

from mcore.core.config import Config, ConfigErrors, component, load_config
from mcore.core.errors import (
    ConfigError,
    DuplicateComponentError,
    McoreError,
    PluginError,
    UnknownComponentError,
)
from mcore.core.hookspecs import hookimpl
from mcore.core.plugins import (
    PluginManager,
    get_plugin_manager,
    get_registry,
    register_plugin,
    unregister_plugin,
)
from mcore.core.registry import KINDS, CliCommand, Lazy, PluginRegistrar

try:
    __version__ = _md.version("mcore-core")
except _md.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "KINDS",
    "CliCommand",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "DuplicateComponentError",
    "Lazy",
    "McoreError",
    "PluginError",
    "PluginManager",
    "PluginRegistrar",
    "UnknownComponentError",
    "__version__",
    "component",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "load_config",
    "register_plugin",
    "unregister_plugin",
]
