"""Data parallelism: bucketed gradient buffers and ``DistributedDataParallel``.

Names resolve on first use so that the plugin can import :class:`DDPConfig` (its ``[ddp]``
config section) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Bucket": "mcore.parallel.distributed.buckets",
    "DDPConfig": "mcore.parallel.distributed.config",
    "DistributedDataParallel": "mcore.parallel.distributed.ddp",
    "GradBuffer": "mcore.parallel.distributed.buckets",
    "build_grad_buffers": "mcore.parallel.distributed.buckets",
    "wrap_ddp": "mcore.parallel.distributed.ddp",
}

__all__ = [
    "Bucket",
    "DDPConfig",
    "DistributedDataParallel",
    "GradBuffer",
    "build_grad_buffers",
    "wrap_ddp",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from mcore.parallel.distributed.buckets import Bucket, GradBuffer, build_grad_buffers
    from mcore.parallel.distributed.config import DDPConfig
    from mcore.parallel.distributed.ddp import DistributedDataParallel, wrap_ddp
