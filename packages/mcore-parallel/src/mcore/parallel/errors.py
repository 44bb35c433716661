"""Errors of mcore.parallel: each names the sizes or shapes involved and what to change."""

from __future__ import annotations

from mcore.core import McoreError


class ParallelLayoutError(McoreError, ValueError):
    """A parallel size is invalid, or a size does not split evenly over a parallel group."""


class DistributedNotInitializedError(McoreError, RuntimeError):
    """A parallel layout needs more than one rank but torch.distributed is not initialized."""


class ShardShapeError(McoreError, ValueError):
    """A full (global) tensor or a weight override does not have the shape a layer expects."""
