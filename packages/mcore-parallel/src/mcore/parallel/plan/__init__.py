"""``mcore plan``: per-rank memory, communication and FLOPs of a run at any world size, from
the run's own model built on ``meta`` tensors in a fake process group (no GPUs, no peers).

The names load on first use, so that ``mcore``'s argument parsing (which imports
``mcore.parallel.plan.cli``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcore.parallel.plan.planner import Plan, Role, check_layout, make_plan

__all__ = ["Plan", "Role", "check_layout", "make_plan"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("mcore.parallel.plan.planner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
