"""Per-rank bytes held by sharded modules, counted from the tensors themselves.

Used by the tests that check ``optim_grads_params`` memory falls as 1/N and by the benchmark;
it counts allocated storage (padding included), never timings or allocator statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass
class MemoryFootprint:
    """Bytes this rank holds, by role."""

    main_params: int = 0
    """The sharded (fp32) main weights: what the optimizer updates."""
    main_grads: int = 0
    """The sharded gradients that ``param.grad`` views."""
    optimizer_state: int = 0
    """Local tensors of the optimizer's state (e.g. AdamW's two moments and step)."""
    unsharded_params: int = 0
    """Gathered compute copies currently allocated."""
    grad_accumulators: int = 0
    """Full-size gradient accumulators currently allocated (persistent for no_shard/optim)."""
    gather_buffers: int = 0
    """The persistent double buffers of the parameter all-gather."""

    @property
    def params_grads_optimizer(self) -> int:
        """Main weights + gradients + optimizer state: the model-state memory ZeRO shards."""
        return self.main_params + self.main_grads + self.optimizer_state

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def memory_footprint(
    module: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> MemoryFootprint:
    """What ``module``'s sharded units (and ``optimizer``'s state) hold on this rank."""
    out = MemoryFootprint()
    pools = {}
    for sub in module.modules():
        unit = getattr(sub, "_fsdp_unit", None)
        if unit is None:
            continue
        for bucket in unit.buckets:
            out.main_params += bucket.main_bytes()
            out.main_grads += bucket.main_grad_bytes()
            out.unsharded_params += bucket.unsharded_bytes()
            out.grad_accumulators += bucket.grad_acc_bytes()
        if unit.ctx is not None:
            pools[id(unit.ctx.pool)] = unit.ctx.pool
    out.gather_buffers = sum(pool.nbytes for pool in pools.values())
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    out.optimizer_state += _local_bytes(value)
    return out
