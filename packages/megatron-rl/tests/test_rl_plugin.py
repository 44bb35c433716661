"""megatron-rl's plugin contributes the [rl] section."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, PluginManager, load_config


@pytest.fixture
def manager() -> PluginManager:
    """The installed entry points of exactly these packages (and the core)."""
    return PluginManager().load_entry_points(only=["megatron-rl"])


def test_rl_section_is_registered(manager) -> None:
    config = load_config(overrides={"rl.kl-estimator": "k1"}, manager=manager)
    assert config.rl.kl_estimator == "k1"


def test_rl_fields_are_checked(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={"rl.group-size": "1", "rl.kl-estimator": "k4", "rl.temperature": "0"},
            manager=manager,
        )
    assert info.value.errors == [
        "rl.kl_estimator: must be one of 'k1', 'k2', 'k3', got 'k4'",
        "rl.group_size: must be >= 2: a group of one has no relative advantage",
        "rl.temperature: must be > 0, got 0.0",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"rl.sft-iters": "-1", "rl.sft-lr": "0"}, manager=manager)
    assert info.value.errors == [
        "rl.sft_iters: must be >= 0, got -1",
        "rl.sft_lr: must be > 0, got 0.0",
    ]
