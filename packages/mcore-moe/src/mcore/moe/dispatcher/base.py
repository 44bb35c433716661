"""What every token dispatcher implements: send tokens to their experts' ranks and back.

A dispatcher is built as ``Dispatcher(ctx, moe, *, num_local_experts, local_expert_indices)``
by the ``token_dispatcher`` registry. :meth:`TokenDispatcher.dispatch` takes this rank's tokens
with their routing (``probs`` and ``routing_map``, both ``[tokens, num_experts]``) and returns
the tokens this rank's experts must process, grouped expert by expert (all tokens of local
expert 0, then of local expert 1, ...), with each row's routing probability. ``combine`` takes
the experts' output rows in that same order and returns ``[tokens, hidden]`` for this rank's
tokens, each token the sum over its experts, weighted by the routing probabilities unless the
experts already applied them. Both are differentiable (tokens and probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mcore.models import ModelContext
    from mcore.moe.config import MoEConfig


@dataclass
class DispatchOutput:
    """Tokens for this rank's experts, expert by expert."""

    tokens: torch.Tensor
    """``[rows, hidden]``: the rows of local expert 0, then of local expert 1, ...; rows past
    ``tokens_per_expert.sum()`` are padding (a dispatcher that sizes its buffers without a host
    read) whose expert outputs may be anything: ``combine`` discards them."""
    tokens_per_expert: torch.Tensor
    """``[num_local_experts]`` int64, on the CPU or the tokens' device: how many rows each local
    expert gets."""
    probs: torch.Tensor
    """``[rows]``: each row's routing probability (fp32)."""


class TokenDispatcher:
    """Base class of dispatchers (the :class:`mcore.moe.protocols.TokenDispatcher` protocol);
    holds what all of them need from the model's context."""

    def __init__(
        self,
        ctx: ModelContext,
        moe: MoEConfig,
        *,
        num_local_experts: int,
        local_expert_indices: list[int],
    ) -> None:
        self.ctx, self.moe = ctx, moe
        self.parallel_state = ctx.parallel_state
        if moe.num_experts is None:
            raise ValueError("a token dispatcher needs moe.num_experts to be set")
        self.num_experts = moe.num_experts
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> DispatchOutput:
        """Send ``hidden`` ``[tokens, hidden]`` to the experts ``routing_map`` (bool
        ``[tokens, num_experts]``) picks, with ``probs`` (``[tokens, num_experts]``, zero where
        not routed). Remembers what :meth:`combine` needs to undo it."""
        raise NotImplementedError

    def combine(self, expert_output: torch.Tensor, *, probs_applied: bool = False) -> torch.Tensor:
        """Bring ``expert_output`` (rows as :meth:`dispatch` returned them) back to the tokens
        they came from: ``[tokens, hidden]``. ``probs_applied`` says the experts already
        multiplied each row by its probability."""
        raise NotImplementedError
