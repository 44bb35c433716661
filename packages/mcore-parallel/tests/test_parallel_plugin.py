"""mcore-parallel's plugin contributes the [parallel] section with checked sizes."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, PluginManager, load_config
from mcore.parallel import ParallelConfig


@pytest.fixture
def manager() -> PluginManager:
    """The installed entry points of exactly these packages (and the core)."""
    return PluginManager().load_entry_points(only=["mcore-parallel"])


def test_parallel_components_are_registered(manager) -> None:
    assert manager.components_of("mcore-parallel") == {
        "config_section": ["ddp", "parallel"],
        "cli_command": ["plan"],
        "data_parallel": ["ddp"],
        "optimizer": ["adam", "sgd"],
        "linear_backend": ["torch"],
    }
    config = load_config(overrides={"parallel.tensor-model-parallel-size": "2"}, manager=manager)
    assert config.parallel == ParallelConfig(tensor_model_parallel_size=2)


def test_sizes_must_be_positive_and_interleaving_needs_a_pipeline(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "parallel.context-parallel-size": "0",
                "parallel.virtual-pipeline-model-parallel-size": "2",
            },
            manager=manager,
        )
    assert info.value.errors == [
        "parallel.context_parallel_size: must be >= 1, got 0",
        "parallel.virtual_pipeline_model_parallel_size: is 2, but interleaving needs "
        "pipeline_model_parallel_size > 1",
    ]


def test_short_megatron_style_aliases_set_the_sizes(manager) -> None:
    config = load_config(
        overrides={"parallel.tp": "2", "parallel.pp": "2", "parallel.dp": "1"}, manager=manager
    )
    assert config.parallel.tensor_model_parallel_size == 2
    assert config.parallel.pipeline_model_parallel_size == 2
    assert config.parallel.data_parallel_size == 1


def test_a_data_parallel_size_that_disagrees_with_the_world_is_refused() -> None:
    from mcore.core.testing import run_ranks

    def build(rank, world):
        from mcore.parallel import ParallelLayoutError, ParallelState

        try:
            ParallelState.from_config(
                ParallelConfig(tensor_model_parallel_size=2, data_parallel_size=2)
            )
        except ParallelLayoutError as exc:
            return str(exc)
        return None

    [message, _] = run_ranks(build, 2, backend="gloo")
    assert message.startswith("data_parallel_size is 2, but world size 2")
