"""mcore-models' plugin: the ``[model]`` section and the modules models are built from.

Modules are registered lazily (by import path), so loading plugins does not import torch.
"""

from __future__ import annotations

import importlib.util

from mcore.core import Config, ConfigErrors, Lazy, PluginRegistrar, hookimpl
from mcore.models.config import TransformerConfig, validate_against_parallel

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "MISTRAL",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
}


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "model", TransformerConfig)
    registry.add("model", "gpt", Lazy("mcore.models.gpt:build_gpt_model"))
    registry.add("norm", "RMSNorm", Lazy("mcore.models.norms:RMSNorm"))
    registry.add("norm", "LayerNorm", Lazy("mcore.models.norms:LayerNorm"))
    registry.add("attention", "self_attention", Lazy("mcore.models.attention:SelfAttention"))
    registry.add("attention", "mla", Lazy("mcore.models.attention:MLASelfAttention"))
    registry.add("mlp", "mlp", Lazy("mcore.models.mlp:MLP"))
    registry.add("layer", "*", Lazy("mcore.models.layer:attention_layer_spec"))
    registry.add("layer", "-", Lazy("mcore.models.layer:mlp_layer_spec"))
    registry.add("attention_backend", "sdpa", Lazy("mcore.models.backends:SDPAAttention"))
    if importlib.util.find_spec("transformer_engine") is not None:
        registry.add("attention_backend", "te", Lazy("mcore.models.backends:TEAttention"))
    for name, attr in HF_ARCHITECTURES.items():
        registry.add("hf_architecture", name, Lazy(f"mcore.models.hf.architectures:{attr}"))


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    validate_against_parallel(config, errors)
