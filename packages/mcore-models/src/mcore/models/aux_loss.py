"""Auxiliary losses that train a model without changing the loss it returns.

MoE balancing losses (mcore-moe) and multi-token prediction (:mod:`mcore.models.mtp`) add a
term to the training objective that is computed deep inside the model. Rather than threading
it out to the training loop, :class:`AuxLossAutoScaler` hangs it on an activation: forward is
the identity, and backward gives the auxiliary loss the gradient ``scale`` as if it had been
added to the loss. ``scale`` must match the main loss's backward scale (1 / micro-batches,
times the fp16 loss scale); the training runtime sets it on every module with an
``aux_loss_scale`` attribute before each step.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AuxLossAutoScaler"]


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output`` whose backward also gives ``aux_loss`` the gradient ``scale``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None
