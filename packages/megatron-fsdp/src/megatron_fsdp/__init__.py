"""megatron_fsdp: fully sharded data parallel on DTensor, for any PyTorch model.

This package depends on torch alone. Its mcore integration lives in
:mod:`megatron_fsdp.mcore_adapter`, which only mcore's plugin loader imports.
"""

from __future__ import annotations

import importlib.metadata as _md

SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")

try:
    __version__ = _md.version("megatron-fsdp")
except _md.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["SHARDING_STRATEGIES", "__version__"]
