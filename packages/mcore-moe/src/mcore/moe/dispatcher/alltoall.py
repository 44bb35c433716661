"""The ``alltoall`` dispatcher: each token goes only to the ranks of its experts.

Dispatch: permute this rank's tokens expert by expert, all-to-all them over the EP group (each
EP rank receives the rows for its experts from every rank), all-gather them over the ETP group
when experts are tensor-parallel, and regroup the received chunks from (ETP rank, source rank,
expert) order into (expert, ETP rank, source rank) order so each local expert's rows are
contiguous. Combine runs the same steps backwards (a reduce-scatter over ETP sums the shards'
partial outputs) and un-permutes with the routing probabilities.

Host reads: the split sizes are the one this dispatcher keeps, as Megatron-Core's does. The
all-to-all needs every rank's token count per expert on the host before it can start, so
``dispatch`` copies this rank's counts to the CPU (a sync with the device) and exchanges them,
once per layer and micro-batch (even when padding to capacity makes them static); everything
else it sizes comes from those counts. The same read says whether every token went to the same
number of experts (plain top-k routing, nothing dropped or padded), in which case the
permutation moves rows by gathers only (see :mod:`mcore.moe.permute`). The ``allgather``
dispatcher reads nothing back.
"""

from __future__ import annotations

import torch

from mcore.moe.dispatcher.base import DispatchOutput, TokenDispatcher
from mcore.moe.dispatcher.comm import all_gather_v, all_to_all, gather_sizes, reduce_scatter_v
from mcore.moe.permute import permute, sort_chunks_by_index, unpermute


class AllToAllDispatcher(TokenDispatcher):
    """All-to-all over expert-parallel ranks, all-gather over expert-tensor-parallel ranks."""

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> DispatchOutput:
        ps, nl, fused = self.parallel_state, self.num_local_experts, self.moe.permute_fusion
        ep, etp = ps.ep_size, ps.etp_size
        self._num_tokens = hidden.shape[0]
        sizes, self._topk = _split_sizes(routing_map)
        counts = torch.tensor(sizes)  # [num_experts], on the CPU
        rows, row_probs, self._sorted = permute(
            hidden,
            routing_map,
            probs,
            num_out_tokens=sum(sizes),
            fused=fused,
            topk=self._topk,
        )
        self._row_probs = row_probs
        # recv[s, j]: rows source rank s sends to this rank's local expert j.
        every = torch.tensor(gather_sizes(counts, ps.ep_group)).view(ep, ep, nl)
        recv = every[:, ps.ep_rank, :]
        self._in_splits = counts.view(ep, nl).sum(dim=1).tolist()
        self._out_splits = recv.sum(dim=1).tolist()
        rows = all_to_all(rows, self._out_splits, self._in_splits, ps.ep_group)
        rows_probs = all_to_all(row_probs, self._out_splits, self._in_splits, ps.ep_group)
        if etp > 1:
            chunks = torch.tensor(gather_sizes(recv.reshape(-1), ps.etp_group)).view(etp, ep, nl)
            self._etp_sizes = chunks.sum(dim=(1, 2)).tolist()
            rows = all_gather_v(rows, self._etp_sizes, ps.etp_group)
            rows_probs = all_gather_v(rows_probs, self._etp_sizes, ps.etp_group)
        else:
            chunks = recv.view(1, ep, nl)
        # Chunk (t, s, j) sits at index (t * ep + s) * nl + j; list them expert-major.
        self._chunk_sizes = chunks.reshape(-1).tolist()
        self._order = [
            (t * ep + s) * nl + j for j in range(nl) for t in range(etp) for s in range(ep)
        ]
        rows, rows_probs = sort_chunks_by_index(
            rows, self._chunk_sizes, self._order, probs=rows_probs, fused=fused
        )
        return DispatchOutput(
            tokens=rows, tokens_per_expert=chunks.sum(dim=(0, 1)), probs=rows_probs
        )

    def combine(self, expert_output: torch.Tensor, *, probs_applied: bool = False) -> torch.Tensor:
        sorted_indices = self._sorted
        if sorted_indices is None:
            raise RuntimeError("AllToAllDispatcher.combine was called without a dispatch before it")
        ps, fused = self.parallel_state, self.moe.permute_fusion
        sorted_sizes = [self._chunk_sizes[i] for i in self._order]
        inverse = [0] * len(self._order)
        for position, chunk in enumerate(self._order):
            inverse[chunk] = position
        out, _ = sort_chunks_by_index(expert_output, sorted_sizes, inverse, fused=fused)
        if ps.etp_size > 1:
            out = reduce_scatter_v(out, self._etp_sizes, ps.etp_group)
        out = all_to_all(out, self._in_splits, self._out_splits, ps.ep_group)
        probs = None if probs_applied else self._row_probs
        out = unpermute(
            out, sorted_indices, self._num_tokens, probs=probs, fused=fused, topk=self._topk
        )
        self._row_probs = self._sorted = None
        return out


def _split_sizes(routing_map: torch.Tensor) -> tuple[list[int], int | None]:
    """This rank's token count per expert and, when every token is routed to the same number
    ``k`` of experts, ``k`` (else None): the dispatcher's one host read."""
    counts = routing_map.sum(dim=0)  # [num_experts]
    if routing_map.shape[0] == 0:
        return counts.tolist(), None
    least, most = routing_map.sum(dim=1).aminmax()
    *counts, least, most = torch.cat([counts, least.view(1), most.view(1)]).tolist()
    return counts, least if least == most and least > 0 else None
