"""The ``[ddp]`` config section: how data-parallel gradients are bucketed and reduced.

Kept free of torch imports: the plugin registers this section when ``mcore plugins`` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class DDPConfig:
    """Data-parallel gradient reduction: bucket size, reduction precision and overlap."""

    bucket_size_mb: float = 25.0
    """Gradient bucket size in MiB; each bucket is reduced by one collective."""
    grad_reduce_in_fp32: bool = field(
        default=False, metadata={"megatron": "--accumulate-allreduce-grads-in-fp32"}
    )
    """Accumulate and reduce gradients in fp32 even when parameters are bf16/fp16."""
    overlap_grad_reduce: bool = field(default=True, metadata={"megatron": "--overlap-grad-reduce"})
    """Start each bucket's reduction during backward, as soon as its gradients are ready."""
    average_in_collective: bool = field(
        default=False, metadata={"megatron": "--ddp-average-in-collective"}
    )
    """Average inside the collective (ReduceOp.AVG) instead of pre-dividing by the DP size."""
    reduce_scatter_with_fp32_accumulation: bool = field(
        default=False, metadata={"megatron": "--ddp-reduce-scatter-with-fp32-accumulation"}
    )
    """Distributed optimizer only: reduce-scatter through an all-to-all that sums in fp32."""

    def validate(self, errors: ConfigErrors) -> None:
        if self.bucket_size_mb <= 0:
            errors.add("bucket_size_mb", f"must be > 0, got {self.bucket_size_mb}")
