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
    _validate_layer_symbols(config, errors)


def _validate_layer_symbols(config: Config, errors: ConfigErrors) -> None:
    """Every symbol of the layer pattern names a registered layer; a symbol of a known package
    that is not installed says which to install."""
    from mcore.core import get_plugin_manager
    from mcore.core.registry import provider_of
    from mcore.models.hybrid import PatternError

    if "model" not in config:
        return
    try:
        pattern = config.model.layer_pattern
    except PatternError:
        return  # reported by the model section
    if pattern is None:
        return
    known = get_plugin_manager().registries.names("layer")
    for symbol in sorted(pattern.symbols - set(known)):
        package = provider_of("layer", symbol)
        fix = f"install {package}" if package else f"use one of {' '.join(sorted(known))}"
        errors.add(
            "model.hybrid_override_pattern",
            f"layer symbol {symbol!r} is not registered by any installed package: {fix}",
        )
