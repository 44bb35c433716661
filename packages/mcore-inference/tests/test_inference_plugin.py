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


def test_engine_and_server_knobs_are_checked(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "inference.kv-cache-blocks": "1",
                "inference.heartbeat-timeout-s": "0",
                "inference.cuda-graph-decode-sizes": "1,0",
                "inference.suspend-mode": "drop",
            },
            manager=manager,
        )
    text = "\n".join(info.value.errors)
    assert "inference.kv_cache_blocks: must be >= 2" in text
    assert "inference.heartbeat_timeout_s: must be > 0" in text
    assert "inference.cuda_graph_decode_sizes: sizes must be >= 1" in text
    assert "inference.suspend_mode" in text


def test_generate_and_serve_are_commands(manager) -> None:
    assert {"generate", "serve"} <= set(manager.registries["cli_command"].names())
