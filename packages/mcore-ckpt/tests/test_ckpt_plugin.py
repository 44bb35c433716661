"""mcore-ckpt's plugin refuses checkpoint formats that mcore does not carry."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, PluginManager, load_config


@pytest.fixture
def manager() -> PluginManager:
    """The installed entry points of exactly these packages (and the core)."""
    return PluginManager().load_entry_points(only=["mcore-ckpt"])


def test_zarr_is_refused_with_the_format_to_use(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"checkpoint.ckpt-format": "zarr"}, manager=manager)
    assert info.value.errors == [
        "checkpoint.ckpt_format: 'zarr' is not supported; use 'torch_dist' "
        "(sharded, resharding on load)"
    ]


def test_supported_formats_pass(manager) -> None:
    for fmt in ("torch_dist", "fsdp_dtensor", "hf"):
        config = load_config(overrides={"checkpoint.ckpt-format": fmt}, manager=manager)
        assert config.checkpoint.ckpt_format == fmt


def test_asking_the_api_for_zarr_raises_a_checkpointing_exception() -> None:
    from mcore.ckpt import CheckpointingException, get_format

    with pytest.raises(CheckpointingException, match="'zarr' is not supported; use 'torch_dist'"):
        get_format("zarr")
    assert get_format("torch_dist").name == "torch_dist"


def test_formats_and_the_ckpt_command_are_registered(manager) -> None:
    registries = manager.registries
    assert registries.names("checkpoint_format") == ["fsdp_dtensor", "hf", "torch_dist"]
    assert "ckpt" in registries.names("cli_command")
    assert manager.hooks_of("mcore-ckpt") == ["mcore_checkpointer", "mcore_validate_config"]
