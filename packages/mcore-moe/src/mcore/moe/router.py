"""Routers: which experts each token goes to, and with what weight.

Every router, built in or from a plugin, is a ``torch.nn.Module`` built by the ``router``
registry as ``Router(ctx, moe, *, layer_number)`` whose ``forward(hidden, replay_indices=None)``
maps this rank's tokens ``[tokens, hidden]`` to a :class:`RouterOutput`. What follows routing
(router replay, capacity and token dropping, padding for quantised GEMMs, load-balancing and
z-losses, the aux-loss-free bias update) is shared by all routers and lives in the MoE layer, so a
custom router is a drop-in that only scores tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mcore.models import ModelContext
    from mcore.moe.config import MoEConfig


@dataclass
class RouterOutput:
    """One routing decision for a batch of tokens."""

    probs: torch.Tensor
    """``[tokens, topk]``: the weight of each chosen expert (differentiable, fp32)."""
    indices: torch.Tensor
    """``[tokens, topk]`` int64: the chosen experts."""
    scores: torch.Tensor | None = None
    """``[tokens, num_experts]``: scores over all experts, for the load-balancing loss."""
    logits: torch.Tensor | None = None
    """``[tokens, num_experts]``: the raw logits, for the z-loss."""


class Router(torch.nn.Module):
    """Base class of routers: holds the config; subclasses implement ``forward``."""

    def __init__(self, ctx: ModelContext, moe: MoEConfig, *, layer_number: int) -> None:
        super().__init__()
        self.moe = moe
        self.layer_number = layer_number
        self.num_experts = moe.num_experts
        self.topk = moe.router_topk

    def forward(
        self, hidden: torch.Tensor, replay_indices: torch.Tensor | None = None
    ) -> RouterOutput:
        """Route ``hidden`` ``[tokens, hidden]``. With ``replay_indices`` (``[tokens, topk]``,
        recorded earlier) the router must choose exactly those experts and only recompute
        their probabilities."""
        raise NotImplementedError
