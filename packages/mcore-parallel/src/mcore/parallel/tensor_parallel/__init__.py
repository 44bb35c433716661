"""Tensor and sequence parallelism: differentiable collectives, parallel linear and embedding
layers, and cross-entropy over vocab-parallel logits (or fused with the output layer, chunked)."""

from mcore.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mcore.parallel.tensor_parallel.fused_cross_entropy import fused_linear_cross_entropy
from mcore.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    LinearBackend,
    LinearKernel,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_linear_backend,
    torch_linear_backend,
)
from mcore.parallel.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from mcore.parallel.tensor_parallel.utils import init_method_normal

__all__ = [
    "ColumnParallelLinear",
    "LinearBackend",
    "LinearKernel",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_linear_backend",
    "copy_to_tensor_parallel_region",
    "fused_linear_cross_entropy",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "init_method_normal",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "torch_linear_backend",
    "vocab_parallel_cross_entropy",
]
