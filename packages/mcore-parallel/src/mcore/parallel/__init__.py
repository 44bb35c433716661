"""mcore.parallel: process groups, parallel layers, pipeline schedules and data parallelism."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports

# Names resolve on first use, so importing a plugin module of this package (which the plugin
# loader does for `mcore plugins`) does not import torch.
_EXPORTS = {
    "ColumnParallelLinear": "mcore.parallel.tensor_parallel",
    "DDPConfig": "mcore.parallel.distributed",
    "DistributedDataParallel": "mcore.parallel.distributed",
    "DistributedNotInitializedError": "mcore.parallel.errors",
    "DistributedOptimizer": "mcore.parallel.optimizer",
    "DynamicLossScaler": "mcore.parallel.optimizer",
    "MixedPrecisionOptimizer": "mcore.parallel.optimizer",
    "OptimizerParamScheduler": "mcore.parallel.optimizer",
    "P2PCommunicator": "mcore.parallel.pipeline",
    "P2PShapeError": "mcore.parallel.pipeline",
    "ParallelConfig": "mcore.parallel.config",
    "ParallelLayoutError": "mcore.parallel.errors",
    "ParallelState": "mcore.parallel.state",
    "RowParallelLinear": "mcore.parallel.tensor_parallel",
    "ShardShapeError": "mcore.parallel.errors",
    "VocabParallelEmbedding": "mcore.parallel.tensor_parallel",
    "allreduce_embedding_grads": "mcore.parallel.pipeline",
    "build_lr_scheduler": "mcore.parallel.optimizer",
    "context_parallel_attention": "mcore.parallel.context_parallel",
    "copy_to_tensor_parallel_region": "mcore.parallel.tensor_parallel",
    "cp_local_positions": "mcore.parallel.context_parallel",
    "embedding_group": "mcore.parallel.pipeline",
    "forward_backward_no_pipelining": "mcore.parallel.pipeline",
    "forward_backward_pipelining_with_interleaving": "mcore.parallel.pipeline",
    "forward_backward_pipelining_without_interleaving": "mcore.parallel.pipeline",
    "gather_from_context_parallel": "mcore.parallel.context_parallel",
    "gather_from_sequence_parallel_region": "mcore.parallel.tensor_parallel",
    "gather_from_tensor_parallel_region": "mcore.parallel.tensor_parallel",
    "get_forward_backward_func": "mcore.parallel.pipeline",
    "init_method_normal": "mcore.parallel.tensor_parallel",
    "is_expert_parallel": "mcore.parallel.grads",
    "mark_expert_parallel": "mcore.parallel.grads",
    "mark_shared_embedding": "mcore.parallel.pipeline",
    "mark_tp_partial_grad": "mcore.parallel.grads",
    "pipeline_tensor_shape": "mcore.parallel.pipeline",
    "reduce_from_tensor_parallel_region": "mcore.parallel.tensor_parallel",
    "reduce_scatter_to_sequence_parallel_region": "mcore.parallel.tensor_parallel",
    "reduce_tp_partial_grads": "mcore.parallel.grads",
    "scatter_to_sequence_parallel_region": "mcore.parallel.tensor_parallel",
    "scatter_to_tensor_parallel_region": "mcore.parallel.tensor_parallel",
    "split_for_context_parallel": "mcore.parallel.context_parallel",
    "stage_layers": "mcore.parallel.pipeline",
    "vocab_parallel_cross_entropy": "mcore.parallel.tensor_parallel",
    "fused_linear_cross_entropy": "mcore.parallel.tensor_parallel",
}

__all__ = [
    "ColumnParallelLinear",
    "DDPConfig",
    "DistributedDataParallel",
    "DistributedNotInitializedError",
    "DistributedOptimizer",
    "DynamicLossScaler",
    "MixedPrecisionOptimizer",
    "OptimizerParamScheduler",
    "P2PCommunicator",
    "P2PShapeError",
    "ParallelConfig",
    "ParallelLayoutError",
    "ParallelState",
    "RowParallelLinear",
    "ShardShapeError",
    "VocabParallelEmbedding",
    "allreduce_embedding_grads",
    "build_lr_scheduler",
    "context_parallel_attention",
    "copy_to_tensor_parallel_region",
    "cp_local_positions",
    "embedding_group",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "fused_linear_cross_entropy",
    "gather_from_context_parallel",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "get_forward_backward_func",
    "init_method_normal",
    "is_expert_parallel",
    "mark_expert_parallel",
    "mark_shared_embedding",
    "mark_tp_partial_grad",
    "pipeline_tensor_shape",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "reduce_tp_partial_grads",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "split_for_context_parallel",
    "stage_layers",
    "vocab_parallel_cross_entropy",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mcore.parallel.config import (
        ParallelConfig,
    )
    from mcore.parallel.context_parallel import (
        context_parallel_attention,
        cp_local_positions,
        gather_from_context_parallel,
        split_for_context_parallel,
    )
    from mcore.parallel.distributed import (
        DDPConfig,
        DistributedDataParallel,
    )
    from mcore.parallel.errors import (
        DistributedNotInitializedError,
        ParallelLayoutError,
        ShardShapeError,
    )
    from mcore.parallel.grads import (
        is_expert_parallel,
        mark_expert_parallel,
        mark_tp_partial_grad,
        reduce_tp_partial_grads,
    )
    from mcore.parallel.optimizer import (
        DistributedOptimizer,
        DynamicLossScaler,
        MixedPrecisionOptimizer,
        OptimizerParamScheduler,
        build_lr_scheduler,
    )
    from mcore.parallel.pipeline import (
        P2PCommunicator,
        P2PShapeError,
        allreduce_embedding_grads,
        embedding_group,
        forward_backward_no_pipelining,
        forward_backward_pipelining_with_interleaving,
        forward_backward_pipelining_without_interleaving,
        get_forward_backward_func,
        mark_shared_embedding,
        pipeline_tensor_shape,
        stage_layers,
    )
    from mcore.parallel.state import (
        ParallelState,
    )
    from mcore.parallel.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        copy_to_tensor_parallel_region,
        fused_linear_cross_entropy,
        gather_from_sequence_parallel_region,
        gather_from_tensor_parallel_region,
        init_method_normal,
        reduce_from_tensor_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
        scatter_to_tensor_parallel_region,
        vocab_parallel_cross_entropy,
    )
