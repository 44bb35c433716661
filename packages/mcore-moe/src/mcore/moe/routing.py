"""What happens between a router's choice and the dispatcher, the same for every router.

:func:`routing_map_from_topk` turns ``[tokens, topk]`` choices into the dense ``probs`` and
boolean ``routing_map`` (``[tokens, num_experts]``) the dispatchers take; :func:`apply_capacity`
drops (and optionally pads) tokens beyond each expert's capacity; :func:`pad_for_quantization`
routes extra zero-probability tokens so each expert's count is a multiple of the quantised
GEMM's alignment; the losses keep experts balanced, and
:class:`~mcore.models.aux_loss.AuxLossAutoScaler` carries their gradient into backward without
changing the forward.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from mcore.moe.config import MoEConfig


def routing_map_from_topk(
    probs: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(probs [T, E], routing_map [T, E] bool)`` from top-k ``probs`` and ``indices``."""
    tokens = probs.shape[0]
    dense = torch.zeros(tokens, num_experts, dtype=probs.dtype, device=probs.device)
    dense = dense.scatter(1, indices, probs)
    routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool, device=probs.device)
    routing_map.scatter_(1, indices, True)
    return dense, routing_map


def expert_capacity(num_tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """Tokens one expert may take: ``factor`` times the even share, rounded up."""
    return math.ceil(num_tokens * topk / num_experts * factor)


def max_routes(num_tokens: int, num_experts: int, moe: MoEConfig) -> int:
    """At most how many (token, expert) routes ``num_tokens`` tokens send into a block of
    ``num_experts`` of the ``moe`` layer's experts, known without reading the routing.

    Top-k routes per token at most, or one block of ``capacity`` rows per expert when padding to
    capacity, plus up to ``alignment - 1`` zero-probability rows per expert when padding for
    quantised GEMMs. A dispatcher sizes its buffers by it so that no count is read on the host.
    """
    rows = num_tokens * min(moe.router_topk, num_experts)
    factor = moe.expert_capacity_factor
    if factor is not None and moe.pad_expert_input_to_capacity:
        assert moe.num_experts is not None  # an MoE layer's [moe] section always sets it
        capacity = expert_capacity(num_tokens, moe.router_topk, moe.num_experts, factor)
        rows = max(rows, num_experts * min(capacity, num_tokens))
    if moe.padding_alignment is not None:
        rows += num_experts * (moe.padding_alignment - 1)
    return min(rows, num_tokens * num_experts)


def apply_capacity(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    capacity: int,
    *,
    policy: str = "probs",
    pad_to_capacity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` tokens per expert: those with the highest probability
    (``policy='probs'``) or the earliest (``'position'``). With ``pad_to_capacity`` every expert
    gets exactly ``capacity`` rows, filled with unrouted tokens at probability zero."""
    tokens = routing_map.shape[0]
    capacity = min(capacity, tokens)
    if policy == "probs":
        # Unrouted tokens score -1 so they are kept only as padding, never over routed ones.
        rank_by = torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
        top = rank_by.topk(capacity, dim=0).indices
        keep = torch.zeros_like(routing_map).scatter_(0, top, True)
    elif policy == "position":
        # The first `capacity` routed tokens in order; padding after them in order too.
        routed_rank = routing_map.long().cumsum(dim=0)
        keep = routing_map & (routed_rank <= capacity)
        if pad_to_capacity:
            missing = capacity - keep.sum(dim=0, keepdim=True)
            unrouted_rank = (~routing_map).long().cumsum(dim=0)
            keep = keep | (~routing_map & (unrouted_rank <= missing))
    else:
        raise ValueError(f"moe.token_drop_policy: unknown policy {policy!r} (probs, position)")
    new_map = keep if pad_to_capacity else keep & routing_map
    return probs * new_map, new_map


def pad_for_quantization(
    probs: torch.Tensor, routing_map: torch.Tensor, alignment: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route extra tokens (probability zero) so each expert's count is a multiple of
    ``alignment``, as FP8/FP4 grouped GEMMs need; the output is unchanged since the extra rows
    are weighted by zero. Counts that cannot be rounded up within the batch stay as they are."""
    tokens = routing_map.shape[0]
    counts = routing_map.sum(dim=0)
    target = torch.clamp(((counts + alignment - 1) // alignment) * alignment, max=tokens)
    target = torch.where(target > counts, target, counts)
    missing = (target - counts).unsqueeze(0)
    unrouted_rank = (~routing_map).long().cumsum(dim=0)
    extra = ~routing_map & (unrouted_rank <= missing)
    return probs, routing_map | extra


# --- balancing losses ------------------------------------------------------------------------


def load_balancing_loss(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    *,
    num_sequences: int = 1,
    per_sequence: bool = False,
    token_counts: torch.Tensor | None = None,
    total_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (unscaled).

    ``f_e`` is the fraction of routed slots that went to expert ``e``, ``P_e`` the mean score of
    expert ``e``. ``per_sequence`` computes it per sequence (tokens laid out ``[seq, batch]``
    flattened) and averages. ``token_counts``/``total_tokens`` replace the local counts with
    counts over more ranks (the global-batch variant), while ``P_e`` keeps the local gradient.
    """
    num_experts = scores.shape[1]
    if per_sequence:
        seq = scores.shape[0] // num_sequences
        s = scores.view(seq, num_sequences, num_experts)
        f = routing_map.view(seq, num_sequences, num_experts).float().sum(dim=0) / (seq * topk)
        p = s.mean(dim=0)
        return num_experts * (f * p).sum(dim=-1).mean()
    counts = routing_map.float().sum(dim=0) if token_counts is None else token_counts.float()
    n = scores.shape[0] if total_tokens is None else total_tokens
    f = counts / (n * topk)
    p = scores.mean(dim=0)
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): the mean squared log-partition, keeping logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def global_token_counts(
    routing_map: torch.Tensor, groups: list[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per expert and the token count (a 0-d tensor: no host read) summed over
    ``groups`` (the ranks holding other parts of the global batch), for the global-batch
    load-balancing loss."""
    counts = routing_map.float().sum(dim=0)
    total = torch.tensor([float(routing_map.shape[0])], device=counts.device)
    both = torch.cat([counts, total])
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(both, group=group)
    return both[:-1], both[-1]
