"""megatron-fsdp as an mcore plugin: the ``[fsdp]`` config section and the ``megatron_fsdp``
data-parallel wrapper (``--train.data-parallel megatron_fsdp``).

Imported only through the ``mcore`` entry point, so ``megatron_fsdp`` itself never needs mcore.
Loading the plugin imports no torch: the wrapper (:mod:`.wrapper`) is registered by import path
and imported when a run builds its model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core import Config, ConfigErrors, Lazy, PluginRegistrar, hookimpl


@dataclass(kw_only=True)
class FSDPConfig:
    """Megatron-FSDP: what is sharded and how communication overlaps compute."""

    data_parallel_sharding_strategy: Literal[
        "no_shard", "optim", "optim_grads", "optim_grads_params"
    ] = field(
        default="optim_grads_params",
        metadata={"megatron": "--data-parallel-sharding-strategy"},
    )
    """What is sharded over data-parallel ranks (optim_grads_params is ZeRO-3)."""
    num_distributed_optimizer_instances: int = field(
        default=1, metadata={"megatron": "--num-distributed-optimizer-instances"}
    )
    """Replicas for hybrid sharding: shard inside each, replicate across (HSDP)."""
    grad_reduce_in_fp32: bool = True
    """Reduce-scatter gradients in fp32 even when computing in bf16/fp16."""
    overlap_grad_reduce: bool = field(default=True, metadata={"megatron": "--overlap-grad-reduce"})
    """Overlap gradient reduce-scatter with backward."""
    overlap_param_gather: bool = field(
        default=True, metadata={"megatron": "--overlap-param-gather"}
    )
    """Prefetch the next bucket's parameters during compute."""
    fsdp_double_buffer: bool = field(default=True, metadata={"megatron": "--fsdp-double-buffer"})
    """Gather parameters into two persistent buffers instead of allocating per step."""

    def validate(self, errors: ConfigErrors) -> None:
        if self.num_distributed_optimizer_instances < 1:
            errors.add(
                "num_distributed_optimizer_instances",
                f"must be >= 1, got {self.num_distributed_optimizer_instances}",
            )


@hookimpl
def mcore_register(registry: PluginRegistrar) -> None:
    registry.add("config_section", "fsdp", FSDPConfig)
    registry.add(
        "data_parallel",
        "megatron_fsdp",
        Lazy("megatron_fsdp.mcore_adapter.wrapper:wrap_megatron_fsdp"),
    )


@hookimpl
def mcore_validate_config(config: Config, errors: ConfigErrors) -> None:
    if "train" not in config or config.train.data_parallel != "megatron_fsdp":
        return
    if "optimizer" in config and config.optimizer.use_distributed_optimizer:
        errors.add(
            "optimizer.use_distributed_optimizer",
            "megatron_fsdp already shards the optimizer state over data-parallel ranks; set it "
            "to false (choose what is sharded with fsdp.data_parallel_sharding_strategy)",
        )
