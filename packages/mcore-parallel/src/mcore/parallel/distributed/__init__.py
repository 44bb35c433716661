"""Data parallelism: bucketed gradient buffers and ``DistributedDataParallel``.

Names resolve on first use so that the plugin can import :class:`DDPConfig` (its ``[ddp]``
config section) without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports

_EXPORTS = {
    "Bucket": "mcore.parallel.distributed.buckets",
    "DDPConfig": "mcore.parallel.distributed.config",
    "DistributedDataParallel": "mcore.parallel.distributed.ddp",
    "GradBuffer": "mcore.parallel.distributed.buckets",
    "broadcast_params": "mcore.parallel.distributed.ddp",
    "build_grad_buffers": "mcore.parallel.distributed.buckets",
    "compute_dtype": "mcore.parallel.distributed.ddp",
    "wrap_ddp": "mcore.parallel.distributed.ddp",
}

__all__ = [
    "Bucket",
    "DDPConfig",
    "DistributedDataParallel",
    "GradBuffer",
    "broadcast_params",
    "build_grad_buffers",
    "compute_dtype",
    "wrap_ddp",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mcore.parallel.distributed.buckets import Bucket, GradBuffer, build_grad_buffers
    from mcore.parallel.distributed.config import DDPConfig
    from mcore.parallel.distributed.ddp import (
        DistributedDataParallel,
        broadcast_params,
        compute_dtype,
        wrap_ddp,
    )
