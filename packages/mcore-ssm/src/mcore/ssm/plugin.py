"""mcore-ssm's plugin: the ``[ssm]`` section, the ``M`` (Mamba-2) and ``G`` (gated delta net)
layer symbols and their mixers, and the Hugging Face hybrid architectures.

Everything is registered lazily (by import path), so loading plugins does not import torch.
"""

from __future__ import annotations

from mcore.core import Config, ConfigErrors, Lazy, PluginRegistrar, hookimpl
from mcore.ssm.config import SSMConfig

HF_ARCHITECTURES = {
    "NemotronHForCausalLM": "NEMOTRON_H",
    "Qwen3NextForCausalLM": "QWEN3_NEXT",
}


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "ssm", SSMConfig)
    registry.add("mixer", "mamba", Lazy("mcore.ssm.mamba:MambaMixer"))
    registry.add("mixer", "gated_delta_net", Lazy("mcore.ssm.gated_delta_net:GatedDeltaNet"))
    registry.add("layer", "M", Lazy("mcore.ssm.mamba:mamba_layer_spec"))
    registry.add("layer", "G", Lazy("mcore.ssm.gated_delta_net:gated_delta_net_layer_spec"))
    for name, attr in HF_ARCHITECTURES.items():
        registry.add("hf_architecture", name, Lazy(f"mcore.ssm.hf:{attr}"))


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    """Layouts the ``M`` and ``G`` layers cannot run in, named before anything is built."""
    if "model" not in config or "parallel" not in config:
        return
    try:
        pattern = config.model.layer_pattern
    except ValueError:
        return  # the model section reports a pattern it cannot parse
    symbols = pattern.symbols if pattern is not None else set()
    if not symbols & {"M", "G"}:
        return
    par = config.parallel
    if par.context_parallel_size > 1:
        errors.add(
            "parallel.context_parallel_size",
            f"is {par.context_parallel_size}, but the layer pattern has Mamba (M) or gated "
            "delta net (G) layers, which do not support context parallelism: set it to 1",
        )
    ssm = config.ssm if "ssm" in config else SSMConfig()
    tp = par.tensor_model_parallel_size
    sizes = {}
    if "M" in symbols:
        sizes["ssm.mamba_num_groups"] = ssm.mamba_num_groups
        sizes["ssm.mamba_num_heads"] = ssm.mamba_heads(config.model.hidden_size)
    if "G" in symbols:
        sizes["ssm.linear_num_key_heads"] = ssm.linear_num_key_heads
    for name, size in sizes.items():
        if size % tp:
            errors.add(
                name,
                f"{size} does not divide over parallel.tensor_model_parallel_size = {tp}",
            )
