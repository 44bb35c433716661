"""mcore-inference's plugin contributes the [inference] section."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, PluginManager, load_config


@pytest.fixture
def manager() -> PluginManager:
    """The installed entry points of exactly these packages (and the core)."""
    return PluginManager().load_entry_points(only=["mcore-inference"])


def test_server_binds_to_loopback_by_default(manager) -> None:
    config = load_config(manager=manager)
    assert config.inference.host == "127.0.0.1"
    assert config.inference.port is None


def test_inference_fields_are_checked(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={"inference.port": "70000", "inference.block-size-tokens": "0"},
            manager=manager,
        )
    assert info.value.errors == [
        "inference.block_size_tokens: must be >= 1, got 0",
        "inference.port: must be a TCP port (1-65535), got 70000",
    ]
