"""One rank's model chunks, built on the ``meta`` device inside a fake world of N ranks.

torch's ``fake`` process-group backend gives every group its real size and rank while every
collective returns at once without touching data, so a ``ParallelState`` of 2,048 ranks and the
layers built on it are exactly what that rank would build, with no memory and no peers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mcore.parallel.state import ParallelState
from mcore.parallel.training import build_meta_chunks


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """``torch.distributed`` initialised with the fake backend as ``rank`` of ``world_size``;
    destroyed on exit, so a later real ``init_process_group`` is not affected."""
    if dist.is_initialized():
        raise RuntimeError(
            "mcore plan builds ranks in a fake process group and needs torch.distributed "
            "uninitialised; run it in its own process"
        )
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def stage_rank(parallel: Any, world_size: int, pp_rank: int) -> int:
    """The global rank at pipeline stage ``pp_rank`` with every other coordinate 0 (dense mesh
    ``pp x dp x cp x tp`` is row-major, so that is ``pp_rank * world / pp``)."""
    return pp_rank * (world_size // parallel.pipeline_model_parallel_size)


@dataclass
class Stage:
    """What one rank of a pipeline stage holds: its model chunks, on ``meta``."""

    parallel_state: ParallelState
    chunks: list[torch.nn.Module]


def build_stage(config: Any, model_config: Any, registries: Any) -> Stage:
    """This (fake) rank's model chunks, on ``meta``, as ``MeshTrainingRuntime.build`` makes
    them (one per virtual pipeline stage). Call inside :func:`fake_world`."""
    ps = ParallelState.from_config(config.parallel)
    return Stage(ps, build_meta_chunks(config, model_config, registries, ps))
