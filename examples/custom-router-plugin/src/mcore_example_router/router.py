"""A router that sends every token to ``topk`` experts chosen uniformly at random.

It learns nothing and ignores the hidden states, which makes it a baseline for load balance and a
small, complete example of a router: a ``torch.nn.Module`` whose ``forward`` maps the hidden
states of ``tokens`` tokens to routing probabilities and expert indices, both ``[tokens, topk]``.
The full router interface arrives with mcore-moe; this class keeps to its core.
"""

from __future__ import annotations

from typing import Any

import torch


class RandomRouter(torch.nn.Module):
    """Route each token to ``topk`` distinct experts out of ``num_experts``, uniformly at random.

    Args:
        num_experts: experts to choose from.
        topk: experts per token; ``1 <= topk <= num_experts``.
        seed: seeds the router's own ``torch.Generator``, so routing is reproducible and does not
            disturb the global random state.
    """

    def __init__(self, num_experts: int, topk: int, *, seed: int = 0) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        self.num_experts = num_experts
        self.topk = topk
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, config: Any, *, seed: int = 0) -> RandomRouter:
        """Build from a config with ``num_experts`` and ``router_topk`` (mcore's ``[moe]``)."""
        return cls(config.num_experts, config.router_topk, seed=seed)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``hidden`` of shape ``[tokens, hidden_size]``.

        Returns ``(probs, indices)``, both ``[tokens, topk]``: ``indices`` holds distinct expert
        ids per token (int64) and ``probs`` is ``1 / topk`` everywhere, in ``hidden``'s dtype.
        """
        if hidden.dim() != 2:
            raise ValueError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        tokens = hidden.shape[0]
        # The top-k of i.i.d. uniform scores is a uniformly random k-subset of the experts.
        # Scores are drawn on the CPU generator, so a seed routes the same way on any device.
        scores = torch.rand(tokens, self.num_experts, generator=self.generator)
        indices = scores.topk(self.topk, dim=-1).indices.to(hidden.device)
        probs = torch.full((tokens, self.topk), 1.0 / self.topk, dtype=hidden.dtype)
        return probs.to(hidden.device), indices

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, topk={self.topk}"
