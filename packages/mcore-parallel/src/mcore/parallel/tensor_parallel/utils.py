"""Small helpers shared by the tensor-parallel mappings, layers and loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mcore.parallel.errors import ParallelLayoutError

InitMethod = Callable[[torch.Tensor], Any]
"""Fills a tensor in place (``torch.nn.init.normal_`` and friends)."""


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group``; ``None`` (a single-process state) counts as one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, raising with ``what`` named when it does not divide."""
    if numerator % denominator != 0:
        raise ParallelLayoutError(
            f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})"
        )
    return numerator // denominator


def init_method_normal(std: float = 0.02) -> InitMethod:
    """An init method drawing from ``N(0, std²)``: the default for weights (Megatron's too)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_
