"""The ``allgather`` dispatcher: every expert rank sees every token of its replica.

Tokens, probabilities and routing maps are all-gathered over the ``ep_etp`` group; each rank
permutes the gathered tokens for its local experts, and ``combine`` reduce-scatters the experts'
outputs back, which also sums the partial outputs of expert-tensor-parallel shards. Simple and
robust; it moves ``ep * etp`` times the tokens, so ``alltoall`` is the choice at scale.

It reads nothing data-dependent on the host: the permuted rows are sized by
:func:`~mcore.moe.routing.max_routes`, a bound known from the token counts and the config, and
the rows past the routed ones are padding (zero tokens at probability zero) whose expert
outputs ``combine`` discards. Under expert parallelism the ranks' token counts (shapes, not
data) are still exchanged per layer, which on NCCL waits for the device.
"""

from __future__ import annotations

import torch

from mcore.moe.dispatcher.base import DispatchOutput, TokenDispatcher
from mcore.moe.dispatcher.comm import all_gather_v, gather_sizes, reduce_scatter_v
from mcore.moe.permute import permute, unpermute
from mcore.moe.routing import max_routes


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
        nl, fused = self.num_local_experts, self.moe.permute_fusion
        rows_bound = sum(max_routes(n, nl, self.moe) for n in self._sizes)
        rows, row_probs, self._sorted = permute(
            hidden, local_map, local_probs, num_out_tokens=rows_bound, fused=fused
        )
        self._row_probs, self._num_tokens = row_probs, hidden.shape[0]
        counts = local_map.sum(dim=0)
        self._routed_rows = counts.sum()
        return DispatchOutput(tokens=rows, tokens_per_expert=counts, probs=row_probs)

    def combine(self, expert_output: torch.Tensor, *, probs_applied: bool = False) -> torch.Tensor:
        sorted_indices, routed_rows = self._sorted, self._routed_rows
        if sorted_indices is None or routed_rows is None:
            raise RuntimeError(
                "AllGatherDispatcher.combine was called without a dispatch before it"
            )
        # The experts leave the padding rows undefined (possibly inf or nan): where, not a
        # multiply, so they cannot reach the tokens.
        row = torch.arange(expert_output.shape[0], device=expert_output.device)
        expert_output = torch.where((row < routed_rows).unsqueeze(1), expert_output, 0)
        probs = None if probs_applied else self._row_probs
        out = unpermute(
            expert_output,
            sorted_indices,
            self._num_tokens,
            probs=probs,
            fused=self.moe.permute_fusion,
        )
        self._row_probs = self._sorted = self._routed_rows = None
        return reduce_scatter_v(out, self._sizes, self.parallel_state.ep_etp_group)
