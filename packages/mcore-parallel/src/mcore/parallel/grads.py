"""Gradients of replicated parameters that each tensor-parallel rank only partly computes.

A norm weight under sequence parallelism sees only this rank's sequence shard; a qk-norm weight
shared by all heads sees only this rank's heads; a row-parallel bias under sequence parallelism
sees only part of the sequence. Their gradients must be summed over TP before the optimizer step.
Layers mark such parameters; the data-parallel wrapper (or a test) calls the reduction.
"""

from __future__ import annotations

from typing import Any

import torch


def mark_tp_partial_grad(*params: torch.Tensor) -> None:
    """Mark replicated parameters whose gradient each TP rank only sees part of (norms under
    sequence parallelism, qk-norm over a rank's heads); :func:`reduce_tp_partial_grads` sums them.
    """
    for p in params:
        p.reduce_grad_over_tp = True  # pyright: ignore[reportAttributeAccessIssue]


def reduce_tp_partial_grads(module: torch.nn.Module, tp_group: Any) -> None:
    """Sum over TP ranks the gradients of parameters marked by :func:`mark_tp_partial_grad`.

    Call after backward and before the optimizer step (the data-parallel wrapper does).
    """
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return
    grads = [
        p.grad
        for p in module.parameters()
        if getattr(p, "reduce_grad_over_tp", False) and p.grad is not None
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mark_expert_parallel(*params: torch.Tensor) -> None:
    """Mark parameters of experts, which differ across expert-parallel ranks: their gradients
    are reduced over the expert-data-parallel group (``edp``) instead of ``dp_cp``, and each
    expert-parallel rank counts its own in the gradient norm."""
    for p in params:
        p.expert_parallel = True  # pyright: ignore[reportAttributeAccessIssue]


def is_expert_parallel(param: torch.nn.Parameter) -> bool:
    """Whether ``param`` was marked by :func:`mark_expert_parallel`."""
    return getattr(param, "expert_parallel", False)
