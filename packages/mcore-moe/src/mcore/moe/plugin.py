"""mcore-moe's plugin: the ``[moe]`` section, the ``moe`` MLP and ``E`` layer, routers,
dispatchers, flex backends and the Hugging Face MoE architectures.

Everything is registered lazily (by import path), so loading plugins does not import torch.
"""

from __future__ import annotations

from mcore.core import Config, ConfigErrors, Lazy, PluginRegistrar, hookimpl
from mcore.moe.config import MoEConfig, validate_against_parallel

HF_ARCHITECTURES = {
    "MixtralForCausalLM": "MIXTRAL",
    "Qwen2MoeForCausalLM": "QWEN2_MOE",
    "Qwen3MoeForCausalLM": "QWEN3_MOE",
    "DeepseekV3ForCausalLM": "DEEPSEEK_V3",
}


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "moe", MoEConfig)
    registry.add("mlp", "moe", Lazy("mcore.moe.layer:MoELayer"))
    registry.add("layer", "E", Lazy("mcore.moe.layer:moe_layer_spec"))
    registry.add("router", "topk", Lazy("mcore.moe.router:build_topk_router"))
    registry.add(
        "token_dispatcher", "allgather", Lazy("mcore.moe.dispatcher.allgather:AllGatherDispatcher")
    )
    registry.add(
        "token_dispatcher", "alltoall", Lazy("mcore.moe.dispatcher.alltoall:AllToAllDispatcher")
    )
    registry.add("token_dispatcher", "flex", Lazy("mcore.moe.dispatcher.flex:FlexDispatcher"))
    registry.add("flex_backend", "deepep", Lazy("mcore.moe.dispatcher.deepep:DeepEPBackend"))
    registry.add("flex_backend", "hybridep", Lazy("mcore.moe.dispatcher.hybridep:HybridEPBackend"))
    for name, attr in HF_ARCHITECTURES.items():
        registry.add("hf_architecture", name, Lazy(f"mcore.moe.hf:{attr}"))


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    validate_against_parallel(config, errors)
