"""``mcore plan``: per-rank memory, communication and FLOPs of a run at any world size, from
the run's own model built on ``meta`` tensors in a fake process group (no GPUs, no peers)."""

from mcore.parallel.plan.planner import Plan, Role, check_layout, make_plan

__all__ = ["Plan", "Role", "check_layout", "make_plan"]
