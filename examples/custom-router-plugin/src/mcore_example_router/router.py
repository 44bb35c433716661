"""A router that sends every token to ``topk`` experts chosen uniformly at random.

It learns nothing and ignores the hidden states, which makes it a baseline for load balance and a
small, complete example of an mcore-moe router: a :class:`mcore.moe.router.Router` built by the
``router`` registry as ``RandomRouter(ctx, moe, *, layer_number)`` whose ``forward`` maps this
rank's tokens ``[tokens, hidden]`` to a :class:`~mcore.moe.router.RouterOutput`. Everything after
routing (replay bookkeeping, capacity, dispatch, the experts) is the MoE layer's job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mcore.moe.router import Router, RouterOutput

if TYPE_CHECKING:
    from mcore.models import ModelContext
    from mcore.moe.config import MoEConfig


class RandomRouter(Router):
    """Route each token to ``moe.router_topk`` distinct experts out of ``moe.num_experts``,
    uniformly at random, each with weight ``1 / topk``.

    Args:
        ctx: the model's build context (unused: this router has no weights to shape).
        moe: the ``[moe]`` config section: ``num_experts`` and ``router_topk``.
        layer_number: this MoE layer's index in the model.
        seed: the router's own ``torch.Generator`` starts from ``seed + layer_number``, so
            routing is reproducible, differs between layers and leaves the global random state
            alone. The registry builds with the default; pass another when building directly.
    """

    def __init__(
        self, ctx: ModelContext, moe: MoEConfig, *, layer_number: int, seed: int = 0
    ) -> None:
        super().__init__(ctx, moe, layer_number=layer_number)
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(
                f"moe.router_topk must be in [1, moe.num_experts={self.num_experts}], "
                f"got {self.topk}"
            )
        if ctx.config.recompute_granularity == "full":
            # Recompute reruns the forward, and a second draw would pick other experts than the
            # first did, so the gradients would not match the forward.
            raise ValueError(
                "the example_random router draws new experts on every forward, so it cannot "
                "follow full-layer recompute; set model.recompute_granularity to 'selective' "
                "or leave it unset"
            )
        self.seed = seed + layer_number
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(
        self, hidden: torch.Tensor, replay_indices: torch.Tensor | None = None
    ) -> RouterOutput:
        """Route ``hidden`` ``[tokens, hidden]``; with ``replay_indices`` choose exactly those."""
        if hidden.dim() != 2:
            raise ValueError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        tokens = hidden.shape[0]
        if replay_indices is not None:
            if replay_indices.shape != (tokens, self.topk):
                raise ValueError(
                    f"router replay: recorded indices have shape {tuple(replay_indices.shape)}, "
                    f"this forward routes {tokens} tokens to {self.topk} experts each"
                )
            indices = replay_indices.to(hidden.device, torch.int64)
        else:
            # The top-k of i.i.d. uniform scores is a uniformly random k-subset of the experts.
            # Scores are drawn on the CPU generator, so a seed routes alike on any device.
            scores = torch.rand(tokens, self.num_experts, generator=self.generator)
            indices = scores.topk(self.topk, dim=-1).indices.to(hidden.device)
        probs = torch.full((tokens, self.topk), 1.0 / self.topk, device=hidden.device)
        # No scores or logits: this router has nothing for a load-balancing loss or z-loss to
        # train, and the MoE layer says so if a config asks for either.
        return RouterOutput(probs=probs, indices=indices)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, topk={self.topk}, seed={self.seed}"
