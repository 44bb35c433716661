"""``DistributedOptimizer``: fp32 main weights and optimizer state sharded over data-parallel
ranks (Megatron-Core's ``use_distributed_optimizer``, ZeRO stage 1 with reduce-scattered
gradients).

Each DDP bucket splits into ``dp_cp`` equal contiguous shards (expert buckets into ``edp``
shards); rank ``r`` owns shard ``r`` of every bucket. DDP reduce-scatters each bucket so that
this rank receives exactly the reduced gradient of what it owns; the optimizer keeps fp32 main
weights and Adam moments for those ranges only (``1 / dp`` of the memory), steps them, writes
them into the model's flat parameter buffer and all-gathers every bucket so each rank again
holds the whole updated model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from mcore.parallel.distributed.ddp import DistributedDataParallel
from mcore.parallel.optimizer.mixed_precision import (
    MakeOptimizer,
    MixedPrecisionOptimizer,
    _Shard,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from mcore.parallel.state import ParallelState


class DistributedOptimizer(MixedPrecisionOptimizer):
    """:class:`MixedPrecisionOptimizer` over this data-parallel rank's shard of the parameters.

    ``model`` must be a :class:`~mcore.parallel.distributed.DistributedDataParallel` built with
    ``use_distributed_optimizer=True``. Options are the base class's; the grad norm is also
    summed over ``dp_cp``, since every rank there holds a different shard.
    """

    def __init__(
        self,
        model: DistributedDataParallel,
        parallel_state: ParallelState,
        make_optimizer: MakeOptimizer,
        **options: Any,
    ) -> None:
        if not (isinstance(model, DistributedDataParallel) and model.use_distributed_optimizer):
            raise ValueError(
                "DistributedOptimizer needs the model wrapped in DistributedDataParallel(..., "
                "use_distributed_optimizer=True), which reduce-scatters gradients into shards "
                f"(got {type(model).__name__}); in a config set "
                "optimizer.use_distributed_optimizer = true before wrapping the model"
            )
        super().__init__(model, parallel_state, make_optimizer, **options)

    def _make_shards(self) -> list[_Shard]:
        """The pieces of parameters that fall inside this rank's shard of each bucket."""
        ddp = self.ddp
        assert ddp is not None
        shards = []
        for bucket in ddp.buckets:
            lo, hi = bucket.shard_range(bucket.group_rank, bucket.group_size)
            for p in bucket.params:
                start, end = bucket.buffer.range_of(p)
                if max(start, lo) < min(end, hi):
                    piece = (max(start, lo) - start, min(end, hi) - start)
                    shards.append(self._shard(ddp.param_name(p), p, *piece))
        return shards

    def _norm_groups(self) -> list[ProcessGroup | None]:
        return [self.parallel_state.dp_cp_group, *super()._norm_groups()]

    def _expert_norm_groups(self) -> list[ProcessGroup | None]:
        return [self.parallel_state.edp_group, *super()._expert_norm_groups()]

    def _publish_params(self) -> None:
        """Write this rank's updated shards, then all-gather every bucket's parameters."""
        super()._publish_params()
        ddp = self.ddp
        assert ddp is not None
        works: list[Any] = [  # async_op: each a Work to wait on
            dist.all_gather_into_tensor(
                bucket.param_data,
                bucket.shard(bucket.param_data, bucket.group_rank, bucket.group_size),
                group=bucket.group,
                async_op=True,
            )
            for bucket in ddp.buckets
            if bucket.group_size > 1
        ]
        for work in works:
            work.wait()
