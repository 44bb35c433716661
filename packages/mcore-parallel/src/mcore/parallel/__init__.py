"""mcore.parallel: process groups, parallel layers, pipeline schedules and data parallelism."""

from mcore.parallel.config import ParallelConfig
from mcore.parallel.context_parallel import (
    context_parallel_attention,
    cp_local_positions,
    gather_from_context_parallel,
    split_for_context_parallel,
)
from mcore.parallel.errors import (
    DistributedNotInitializedError,
    ParallelLayoutError,
    ShardShapeError,
)
from mcore.parallel.grads import mark_tp_partial_grad, reduce_tp_partial_grads
from mcore.parallel.state import ParallelState
from mcore.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    init_method_normal,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "DistributedNotInitializedError",
    "ParallelConfig",
    "ParallelLayoutError",
    "ParallelState",
    "RowParallelLinear",
    "ShardShapeError",
    "VocabParallelEmbedding",
    "context_parallel_attention",
    "copy_to_tensor_parallel_region",
    "cp_local_positions",
    "gather_from_context_parallel",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "init_method_normal",
    "mark_tp_partial_grad",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "reduce_tp_partial_grads",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "split_for_context_parallel",
    "vocab_parallel_cross_entropy",
]
