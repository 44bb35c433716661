"""megatron-fsdp as an mcore plugin: the ``[fsdp]`` config section.

Imported only through the ``mcore`` entry point, so ``megatron_fsdp`` itself never needs mcore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcore.core import ConfigErrors, PluginRegistrar, hookimpl


@dataclass(kw_only=True)
class FSDPConfig:
    """Megatron-FSDP: what is sharded and how communication overlaps compute."""

    data_parallel_sharding_strategy: Literal[
        "no_shard", "optim", "optim_grads", "optim_grads_params"
    ] = "optim_grads_params"
    """What is sharded over data-parallel ranks (optim_grads_params is ZeRO-3)."""
    num_distributed_optimizer_instances: int = 1
    """Replicas for hybrid sharding: shard inside each, replicate across (HSDP)."""
    grad_reduce_in_fp32: bool = True
    """Reduce-scatter gradients in fp32 even when computing in bf16/fp16."""
    overlap_grad_reduce: bool = True
    """Overlap gradient reduce-scatter with backward."""
    overlap_param_gather: bool = True
    """Prefetch the next bucket's parameters during compute."""
    fsdp_double_buffer: bool = True
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
