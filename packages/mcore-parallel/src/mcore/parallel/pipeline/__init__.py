"""Pipeline parallelism: which layers a stage holds, point-to-point exchange of activations and
gradients between stages, the 1F1B and interleaved schedules, and tied embeddings over stages.

A training step with pipeline parallelism:

```python
chunks = [GPTModel(config, ps, vp_stage=c, vp_size=vp) for c in range(vp)]  # vp: 1 for 1F1B
forward_backward = get_forward_backward_func(ps, vp_size=vp)
metrics = forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                           model=chunks, num_microbatches=m, seq_length=s,
                           micro_batch_size=b)
# after the data-parallel reduction (if any), before the optimizer step, on every rank
allreduce_embedding_grads(chunks, ps)
```
"""

from mcore.parallel.pipeline.embeddings import (
    allreduce_embedding_grads,
    embedding_group,
    mark_shared_embedding,
)
from mcore.parallel.pipeline.layout import stage_layers
from mcore.parallel.pipeline.p2p import P2PCommunicator, P2PShapeError, pipeline_tensor_shape
from mcore.parallel.pipeline.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)

__all__ = [
    "P2PCommunicator",
    "P2PShapeError",
    "allreduce_embedding_grads",
    "embedding_group",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
    "mark_shared_embedding",
    "pipeline_tensor_shape",
    "stage_layers",
]
