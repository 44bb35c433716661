"""Distillation losses on tensor-parallel shards: no rank ever holds a full vocabulary row.

``vocab_parallel_kl`` takes logits split over the vocabulary (``[s, b, vocab / tp]``, as the
output layer leaves them) and returns each token's KL(teacher || student) with two scalar
all-reduces per softmax; its backward is ``(p_student - p_teacher) / T`` on the local shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(x: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _log_softmax(logits: torch.Tensor, group: Any) -> torch.Tensor:
    """log softmax over a vocabulary split along the last dim across ``group``."""
    top = _all_reduce(logits.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX, group)
    shifted = logits - top
    total = _all_reduce(shifted.exp().sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group)
    return shifted - total.log()


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, group):  # type: ignore[override]
        dtype = torch.promote_types(student.dtype, torch.float32)  # at least fp32
        log_ps = _log_softmax(student.to(dtype) / temperature, group)
        log_pt = _log_softmax(teacher.to(dtype) / temperature, group)
        pt = log_pt.exp()
        kl = _all_reduce((pt * (log_pt - log_ps)).sum(dim=-1), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(log_ps, pt)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        log_ps, pt = ctx.saved_tensors
        grad_student = (log_ps.exp() - pt) * (grad.unsqueeze(-1) / ctx.temperature)
        return grad_student.to(ctx.dtype), None, None, None


def vocab_parallel_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, group: Any = None
) -> torch.Tensor:
    """Per-token ``KL(softmax(teacher / T) || softmax(student / T))`` (``[...]``) of logits
    ``[..., vocab / tp]`` split over ``group``'s ranks; gradients reach ``student`` only."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ: the two models need the same vocabulary"
        )
    return _VocabParallelKL.apply(student, teacher.detach(), temperature, group)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token`` over the positions where ``mask`` is non-zero (0 if none)."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token loss ``[...]`` between hidden states ``[..., h]``: ``1 - cosine`` or the mean
    squared error over the hidden dimension."""
    teacher = teacher.detach().to(student.dtype)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    raise ValueError(f"unknown intermediate loss {kind!r}; use 'cosine' or 'mse'")


def balanced(term: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``term`` rescaled to ``reference``'s magnitude; the scale carries no gradient."""
    return term * (reference.detach() / term.detach().clamp(min=1e-12))
