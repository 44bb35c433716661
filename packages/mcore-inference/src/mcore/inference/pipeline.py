"""The engine over pipeline stages: each stage's ranks hold their layers and their KV cache.

Every stage runs the same engine (the same requests, the same scheduler), so all take the same
decisions without asking each other: a step's flat batch (positions, block tables, slots) is
the same on every stage. What crosses stages:

- at start-up, the number of KV-cache blocks: each stage sizes its cache for its own layers,
  and the stages agree on the smallest count (an all-reduce MIN over the pipeline group), so a
  request that fits on one stage fits on all;
- each step, the hidden states of the batch's tokens, ``[tokens, 1, hidden]``, sent point to
  point from each stage to the next (any host: the same code over TCP);
- each step, what the last stage sampled (token ids, log-probabilities), broadcast to the
  other stages, which record the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class PipelineStages:
    """This rank's place in the pipeline of ``parallel_state`` (``pp_size > 1``)."""

    def __init__(self, parallel_state: Any) -> None:
        self.group = parallel_state.pp_group
        self.rank = parallel_state.pp_rank
        self.size = parallel_state.pp_size
        self.first = self.rank == 0
        self.last = self.rank == self.size - 1
        ranks = dist.get_process_group_ranks(self.group)
        self.previous = None if self.first else ranks[self.rank - 1]
        self.next = None if self.last else ranks[self.rank + 1]
        self.last_rank = ranks[-1]

    def agree_blocks(self, num_blocks: int) -> int:
        """The smallest of the stages' KV-cache block counts."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        count = torch.tensor([num_blocks], dtype=torch.int64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        return int(count.item())

    def forward(self, model: Any, paged: Any) -> torch.Tensor | None:
        """Run this stage on the step's batch: receive the previous stage's hidden states,
        send ours on; the last stage returns the logits, the others None."""
        hidden = None
        if not self.first:
            tokens = paged.input_ids.shape[0]
            size = model.config.hidden_size
            hidden = torch.empty(
                tokens, 1, size, dtype=_dtype(model), device=paged.input_ids.device
            )
            dist.recv(hidden, src=self.previous, group=self.group)
        out = model.forward_paged(paged, hidden_states=hidden)
        if self.last:
            return out
        dist.send(out.contiguous(), dst=self.next, group=self.group)
        return None

    def share(self, sampled: Any) -> Any:
        """What the last stage sampled, on every stage."""
        message = [sampled if self.last else None]
        dist.broadcast_object_list(message, src=self.last_rank, group=self.group)
        return message[0]


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
