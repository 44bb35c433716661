"""The ``allgather`` dispatcher: every expert rank sees every token of its replica.

Tokens, probabilities and routing maps are all-gathered over the ``ep_etp`` group; each rank
permutes the gathered tokens for its local experts, and ``combine`` reduce-scatters the experts'
outputs back, which also sums the partial outputs of expert-tensor-parallel shards. Simple and
robust; it moves ``ep * etp`` times the tokens, so ``alltoall`` is the choice at scale.
"""

from __future__ import annotations

import torch

from mcore.moe.dispatcher.base import DispatchOutput, TokenDispatcher
from mcore.moe.dispatcher.comm import all_gather_v, gather_sizes, reduce_scatter_v
from mcore.moe.permute import permute, unpermute


class AllGatherDispatcher(TokenDispatcher):
    """Gather all tokens of the expert-parallel replica; compute the local experts on them."""

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> DispatchOutput:
        group = self.parallel_state.ep_etp_group
        self._sizes = gather_sizes(hidden.shape[0], group)
        hidden = all_gather_v(hidden, self._sizes, group)
        probs = all_gather_v(probs, self._sizes, group)
        routing_map = all_gather_v(routing_map.to(torch.uint8), self._sizes, group).bool()
        local = slice(self.local_expert_indices[0], self.local_expert_indices[-1] + 1)
        local_map, local_probs = routing_map[:, local], probs[:, local]
        fused = self.moe.permute_fusion
        rows, row_probs, self._sorted = permute(hidden, local_map, local_probs, fused=fused)
        self._row_probs, self._num_tokens = row_probs, hidden.shape[0]
        counts = local_map.sum(dim=0).cpu()
        return DispatchOutput(tokens=rows, tokens_per_expert=counts, probs=row_probs)

    def combine(self, expert_output: torch.Tensor, *, probs_applied: bool = False) -> torch.Tensor:
        probs = None if probs_applied else self._row_probs
        out = unpermute(
            expert_output,
            self._sorted,
            self._num_tokens,
            probs=probs,
            fused=self.moe.permute_fusion,
        )
        self._row_probs = self._sorted = None
        return reduce_scatter_v(out, self._sizes, self.parallel_state.ep_etp_group)
