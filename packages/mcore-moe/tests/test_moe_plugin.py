"""mcore-moe's plugin: the [moe] section with Megatron's knob names and its checks."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, PluginManager, load_config


@pytest.fixture
def manager() -> PluginManager:
    """The installed entry points of exactly these packages (and the core)."""
    return PluginManager().load_entry_points(only=["mcore-parallel", "mcore-models", "mcore-moe"])


def test_megatron_knob_names_set_the_moe_section(manager) -> None:
    config = load_config(
        overrides={
            "moe.num-experts": "8",
            "moe.router-topk": "2",
            "moe.token-dispatcher-type": "flex",
            "moe.flex-dispatcher-backend": "deepep",
            "moe.router-type": "example_random",
        },
        manager=manager,
    )
    assert config.moe.num_experts == 8
    assert config.moe.token_dispatcher_type == "flex"
    assert config.moe.flex_dispatcher_backend == "deepep"
    assert config.moe.router_type == "example_random"


def test_moe_fields_are_checked(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={"moe.num-experts": "4", "moe.router-topk": "6",
                       "moe.flex-dispatcher-backend": "deepep"},
            manager=manager,
        )  # fmt: skip
    assert info.value.errors == [
        "moe.router_topk: 6 exceeds num_experts (4)",
        "moe.flex_dispatcher_backend: is set but token_dispatcher_type is 'alltoall'; "
        "set token_dispatcher_type = 'flex' to use it",
    ]


def test_experts_must_divide_over_expert_parallel_ranks(manager) -> None:
    overrides = {"moe.num-experts": "6", "parallel.expert-model-parallel-size": "4"}
    with pytest.raises(ConfigError, match="6 experts do not divide over .*=4"):
        load_config(overrides=overrides, manager=manager)
    overrides["parallel.expert-model-parallel-size"] = "3"
    assert load_config(overrides=overrides, manager=manager).moe.num_experts == 6
