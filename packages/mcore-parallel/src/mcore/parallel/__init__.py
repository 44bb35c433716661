"""mcore.parallel: process groups, parallel layers, pipeline schedules and data parallelism."""

from mcore.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
