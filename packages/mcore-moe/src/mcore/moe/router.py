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

from mcore.moe.routing import routing_map_from_topk
from mcore.parallel.init import ZEROS, init_tensor, set_init

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
    routing_map: torch.Tensor | None = None
    """``[tokens, num_experts]`` bool: the chosen experts as the dispatchers take them; None
    lets the MoE layer build it (and ``dense_probs``) from ``indices``."""
    dense_probs: torch.Tensor | None = None
    """``[tokens, num_experts]``: ``probs`` at the chosen experts, zero elsewhere (given with
    ``routing_map``)."""
    tokens_per_expert: torch.Tensor | None = None
    """``[num_experts]`` int64: ``routing_map``'s column sums, the load-balancing loss's token
    counts; None lets the MoE layer count them."""


class Router(torch.nn.Module):
    """Base class of routers: holds the config; subclasses implement ``forward`` (the
    :class:`mcore.moe.protocols.Router` protocol)."""

    def __init__(self, ctx: ModelContext, moe: MoEConfig, *, layer_number: int) -> None:
        super().__init__()
        if moe.num_experts is None:
            raise ValueError("a router needs moe.num_experts to be set")
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


class TopKRouter(Router):
    """A linear gate over the hidden states, then top-k: softmax or sigmoid scores, optional
    group-limited choice, an optional per-expert bias for aux-loss-free balancing, normalised
    and scaled probabilities. Covers Mixtral, Qwen-MoE and DeepSeek-V3 routing.

    ``weight`` is ``[num_experts, hidden]``, replicated over tensor-parallel ranks (each rank
    routes its own sequence shard). ``expert_bias`` (with ``router_enable_expert_bias``) shifts
    only which experts are chosen, never the probabilities; the MoE layer moves it toward
    balance after every optimizer step.

    Everything after the gate's matmul (scores, top-k, normalisation, the dense probabilities
    and routing map, the tokens per expert) is one pure function, :func:`fused_topk_routing`,
    run by the ``routing`` submodule: a ``compile_region`` that ``train.compile`` compiles on
    its own (see :class:`FusedTopKRouting`).
    """

    expert_bias: torch.Tensor | None  # a buffer, or None without router_enable_expert_bias

    def __init__(self, ctx: ModelContext, moe: MoEConfig, *, layer_number: int) -> None:
        super().__init__(ctx, moe, layer_number=layer_number)
        self.routing = FusedTopKRouting(moe)
        self.weight = torch.nn.Parameter(torch.empty(self.num_experts, ctx.config.hidden_size))
        init_tensor(self.weight, ctx.init_method())
        self.fp32 = moe.router_dtype == "fp32"
        if moe.router_enable_expert_bias:
            bias = torch.zeros(self.num_experts, dtype=torch.float32)
            self.register_buffer("expert_bias", set_init(bias, ZEROS))
        else:
            self.expert_bias = None
        if ctx.sequence_parallel:
            from mcore.parallel import mark_tp_partial_grad

            mark_tp_partial_grad(self.weight)

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16 must leave the bias in fp32: it accumulates tiny updates.
        bias = self.expert_bias
        out = super()._apply(fn, recurse)
        applied = self.expert_bias
        if bias is not None and applied is not None and applied.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.to(applied.device)
        return out

    def forward(
        self, hidden: torch.Tensor, replay_indices: torch.Tensor | None = None
    ) -> RouterOutput:
        x = hidden.float() if self.fp32 else hidden
        logits = torch.nn.functional.linear(x, self.weight.to(x.dtype))
        probs, indices, scores, dense, routing_map, counts = self.routing(
            logits, self.expert_bias, replay_indices
        )
        return RouterOutput(
            probs=probs,
            indices=indices,
            scores=scores,
            logits=logits,
            routing_map=routing_map,
            dense_probs=dense,
            tokens_per_expert=counts,
        )


RoutedTensors = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor
]
"""What :func:`fused_topk_routing` returns (``scores`` is the only one that may be None)."""


class FusedTopKRouting(torch.nn.Module):
    """:func:`fused_topk_routing` as a module (no parameters), so that ``train.compile``
    compiles it as one region: its elementwise and small reductions over ``[tokens, experts]``
    become a few fused kernels instead of a dozen launches. Like every region it runs eagerly
    unless ``train.compile`` compiles it (``auto``: on CUDA only, as compiling on a CPU costs
    more than it saves; ``on``: anywhere; ``off``: never), and eagerly again if compiling
    fails. Inside a compiled transformer layer it is traced as part of the layer's graph."""

    compile_region = True

    def __init__(self, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe

    def forward(
        self,
        logits: torch.Tensor,
        expert_bias: torch.Tensor | None = None,
        replay_indices: torch.Tensor | None = None,
    ) -> RoutedTensors:
        return fused_topk_routing(logits, self.moe, expert_bias, replay_indices)


def fused_topk_routing(
    logits: torch.Tensor,
    moe: MoEConfig,
    expert_bias: torch.Tensor | None = None,
    replay_indices: torch.Tensor | None = None,
) -> RoutedTensors:
    """Top-k routing of ``logits`` and all the MoE layer needs of it, as one pure function:
    ``(probs [T, k], indices [T, k], scores [T, E], dense_probs [T, E], routing_map [T, E],
    tokens_per_expert [E])``, the first three as :func:`topk_routing` gives them, the dense
    probabilities and routing map as :func:`~mcore.moe.routing.routing_map_from_topk` builds
    them, and the token count per expert (the load-balancing loss's statistics)."""
    routed = topk_routing(logits, moe, expert_bias, replay_indices)
    assert moe.num_experts is not None  # a router's [moe] section always sets it
    dense, routing_map = routing_map_from_topk(routed.probs, routed.indices, moe.num_experts)
    counts = routing_map.sum(dim=0)
    return routed.probs, routed.indices, routed.scores, dense, routing_map, counts


def topk_routing(
    logits: torch.Tensor,
    moe: MoEConfig,
    expert_bias: torch.Tensor | None = None,
    replay_indices: torch.Tensor | None = None,
) -> RouterOutput:
    """Top-k routing of ``logits`` ``[tokens, num_experts]`` as ``moe`` configures it."""
    k = moe.router_topk
    if moe.router_score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        # Softmax is monotonic: choosing on logits or on scores picks the same experts.
        choice = scores if moe.router_pre_softmax else logits.float()
    else:
        scores = torch.sigmoid(logits.float())
        choice = scores
    if expert_bias is not None:
        choice = choice + expert_bias
    if moe.router_num_groups is not None:
        assert moe.router_group_topk is not None, "validated with router_num_groups"
        choice = _mask_to_top_groups(choice, moe.router_num_groups, moe.router_group_topk)
    if replay_indices is not None:
        if replay_indices.shape != (logits.shape[0], k):
            raise ValueError(
                f"router replay: recorded indices have shape {tuple(replay_indices.shape)}, "
                f"this forward routes {logits.shape[0]} tokens to {k} experts each"
            )
        indices = replay_indices.to(logits.device)
    else:
        indices = torch.topk(choice.detach(), k, dim=-1).indices
    if moe.router_score_function == "softmax" and not moe.router_pre_softmax:
        probs = torch.softmax(logits.float().gather(1, indices), dim=-1)
    else:
        probs = scores.gather(1, indices)
        if moe.router_norm_topk_prob:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if moe.router_topk_scaling_factor is not None:
        probs = probs * moe.router_topk_scaling_factor
    if moe.router_score_function == "sigmoid":
        # The load-balancing loss wants a distribution over experts per token.
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    return RouterOutput(probs=probs, indices=indices, scores=scores, logits=logits)


def _mask_to_top_groups(choice: torch.Tensor, groups: int, group_topk: int) -> torch.Tensor:
    """``choice`` with the experts outside each token's ``group_topk`` best groups at -inf.

    A group's strength is the sum of its two best scores (DeepSeek-V3's rule; its only expert's
    score for groups of one).
    """
    tokens, experts = choice.shape
    per_group = choice.view(tokens, groups, experts // groups)
    strength = per_group.topk(min(2, experts // groups), dim=-1).values.sum(dim=-1)
    chosen = strength.topk(group_topk, dim=-1).indices
    keep = torch.zeros_like(strength, dtype=torch.bool).scatter_(1, chosen, True)
    keep = keep.unsqueeze(-1).expand_as(per_group).reshape(tokens, experts)
    return choice.masked_fill(~keep, float("-inf"))


def build_topk_router(ctx: ModelContext, moe: MoEConfig, *, layer_number: int) -> TopKRouter:
    """The ``router`` registry's ``topk`` entry."""
    return TopKRouter(ctx, moe, layer_number=layer_number)
