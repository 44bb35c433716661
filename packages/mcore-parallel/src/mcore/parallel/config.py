"""The ``[parallel]`` config section: the parallel layout of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout: tensor, pipeline, context and expert parallel sizes."""

    tensor_model_parallel_size: int = field(
        default=1, metadata={"megatron": "--tensor-model-parallel-size", "aliases": ("tp",)}
    )
    """Ranks that split each layer's weights (TP)."""
    pipeline_model_parallel_size: int = field(
        default=1, metadata={"megatron": "--pipeline-model-parallel-size", "aliases": ("pp",)}
    )
    """Pipeline stages (PP)."""
    virtual_pipeline_model_parallel_size: int | None = field(
        default=None,
        metadata={"megatron": "--num-virtual-stages-per-pipeline-rank", "aliases": ("vpp",)},
    )
    """Model chunks per pipeline stage for the interleaved schedule."""
    context_parallel_size: int = field(
        default=1, metadata={"megatron": "--context-parallel-size", "aliases": ("cp",)}
    )
    """Ranks that split each sequence (CP)."""
    expert_model_parallel_size: int = field(
        default=1, metadata={"megatron": "--expert-model-parallel-size", "aliases": ("ep",)}
    )
    """Ranks that split the experts of a MoE layer (EP)."""
    expert_tensor_parallel_size: int | None = field(
        default=None, metadata={"megatron": "--expert-tensor-parallel-size", "aliases": ("etp",)}
    )
    """Tensor parallel size inside each expert; unset means the dense TP size."""
    data_parallel_size: int | None = field(default=None, metadata={"aliases": ("dp",)})
    """Data-parallel replicas; unset derives world / (tp x pp x cp), set it to have it checked."""
    sequence_parallel: bool = field(default=False, metadata={"megatron": "--sequence-parallel"})
    """Split activations along the sequence in TP regions (no effect when TP is 1)."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = field(
        default="auto", metadata={"megatron": "--distributed-backend"}
    )
    """Collective backend; auto picks NCCL on CUDA and gloo on CPU."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
            "expert_tensor_parallel_size",
            "data_parallel_size",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.add(name, f"must be >= 1, got {value}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size == 1:
            errors.add(
                "virtual_pipeline_model_parallel_size",
                f"is {vpp}, but interleaving needs pipeline_model_parallel_size > 1",
            )
