"""mcore-models' plugin: the [model] section and its checks against the parallel layout."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, PluginManager, load_config


@pytest.fixture
def manager() -> PluginManager:
    """The installed entry points of exactly these packages (and the core)."""
    return PluginManager().load_entry_points(only=["mcore-parallel", "mcore-models"])


def test_model_section_is_registered(manager) -> None:
    components = manager.components_of("mcore-models")
    assert components["config_section"] == ["model"]
    assert components["model"] == ["gpt"]
    assert components["attention"] == ["mla", "self_attention"]
    assert components["norm"] == ["LayerNorm", "RMSNorm"]
    assert components["hf_architecture"] == [
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    ]  # fmt: skip
    assert manager.hooks_of("mcore-models") == ["mcore_validate_config"]
    config = load_config(overrides={"model.num-layers": "2"}, manager=manager)
    assert config.model.num_layers == 2 and config.model.name == "gpt"


def test_head_shapes_are_checked(manager) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={"model.hidden-size": "100", "model.num-attention-heads": "8",
                       "model.num-query-groups": "3"},
            manager=manager,
        )  # fmt: skip
    assert info.value.errors == [
        "model.hidden_size: 100 is not divisible by num_attention_heads (8); "
        "set kv_channels to use another head size",
        "model.num_query_groups: num_attention_heads (8) must be a multiple of "
        "num_query_groups (3)",
    ]


def test_heads_must_divide_over_tensor_parallel_ranks(manager) -> None:
    overrides = {
        "model.num-attention-heads": "6",
        "model.hidden-size": "96",
        "model.num-query-groups": "2",
        "parallel.tensor-model-parallel-size": "4",
    }
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, manager=manager)
    assert info.value.errors == [
        "model.num_attention_heads: 6 heads do not divide over "
        "parallel.tensor_model_parallel_size=4",
        "model.num_query_groups: 2 key/value groups do not divide over "
        "parallel.tensor_model_parallel_size=4",
    ]
    overrides["parallel.tensor-model-parallel-size"] = "2"
    config = load_config(overrides=overrides, manager=manager)
    assert config.parallel.tensor_model_parallel_size == 2
