"""megatron_fsdp: fully sharded data parallel on DTensor, for any PyTorch model.

This package depends on torch alone. Its mcore integration lives in
:mod:`megatron_fsdp.mcore_adapter`, which only mcore's plugin loader imports.

The public names load on first use, so ``import megatron_fsdp`` (and mcore's plugin discovery,
which imports the adapter through this package) stays cheap until sharding is actually used.
"""

from __future__ import annotations

import importlib
import importlib.metadata as _md
from typing import TYPE_CHECKING, Any

SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")

try:
    __version__ = _md.version("megatron-fsdp")
except _md.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"

_EXPORTS = {
    "FSDPModule": "api",
    "fully_shard": "api",
    "MixedPrecisionPolicy": "policies",
    "OffloadPolicy": "policies",
    "clip_grad_norm_": "clip",
    "total_grad_norm": "clip",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "sharded_state_dict": "checkpoint",
    "MemoryFootprint": "memory",
    "memory_footprint": "memory",
}

__all__ = ["SHARDING_STRATEGIES", "__version__", *_EXPORTS]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
    from megatron_fsdp.api import FSDPModule as FSDPModule
    from megatron_fsdp.api import fully_shard as fully_shard
    from megatron_fsdp.checkpoint import load_checkpoint as load_checkpoint
    from megatron_fsdp.checkpoint import save_checkpoint as save_checkpoint
    from megatron_fsdp.checkpoint import sharded_state_dict as sharded_state_dict
    from megatron_fsdp.clip import clip_grad_norm_ as clip_grad_norm_
    from megatron_fsdp.clip import total_grad_norm as total_grad_norm
    from megatron_fsdp.memory import MemoryFootprint as MemoryFootprint
    from megatron_fsdp.memory import memory_footprint as memory_footprint
    from megatron_fsdp.policies import MixedPrecisionPolicy as MixedPrecisionPolicy
    from megatron_fsdp.policies import OffloadPolicy as OffloadPolicy


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_fsdp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"megatron_fsdp.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
