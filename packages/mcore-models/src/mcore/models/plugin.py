"""mcore-models' plugin: the ``[model]`` section and its cross-section checks."""

from __future__ import annotations

from mcore.core import Config, ConfigErrors, PluginRegistrar, hookimpl
from mcore.models.config import ModelConfig, validate_against_parallel


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "model", ModelConfig)


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    validate_against_parallel(config, errors)
