"""mcore-moe's plugin: the ``[moe]`` section; routers and dispatchers join as they land."""

from __future__ import annotations

from mcore.core import Config, ConfigErrors, PluginRegistrar, hookimpl
from mcore.moe.config import MoEConfig, validate_against_parallel


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "moe", MoEConfig)


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    validate_against_parallel(config, errors)
