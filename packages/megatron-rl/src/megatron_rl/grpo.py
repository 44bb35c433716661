"""GRPO as pure functions on tensors: advantages, per-token losses, aggregation weights.

Notation: ``logp`` is log pi_theta(token) (being trained), ``old_logp`` log pi_old (the policy
before this step's updates), ``rollout_logp`` what the inference engine sampled with,
``ref_logp`` the frozen reference policy, ``A`` the token's advantage.

- Advantages (:func:`group_advantages`): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each
  group (``std`` unbiased, as ``torch.std``, TRL and verl take it), or ``r_i - mean(r)`` without
  std normalisation (Dr.GRPO).
- Policy term (:func:`grpo_token_loss`): with ``ratio = exp(logp - old_logp)``,
  ``pg = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))``; dual clip caps it
  at ``-A * c`` where ``A < 0``; the truncated importance-sampling correction multiplies it by
  ``w = min(exp(old_logp - rollout_logp), cap)`` (no gradient through ``w``).
- KL penalty ``+ beta * k(logp, ref_logp)`` with Schulman's estimators of KL(pi || pi_ref)
  (:func:`kl_penalty`); entropy bonus ``- coeff * H``.
- Aggregation (:func:`token_loss_weights`): the step's loss is ``sum_t w_t * loss_t`` over the
  completion tokens of the *global* batch, with ``w_t`` set by the mode, so micro-batching,
  data parallelism and packing never change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "dr_grpo"]


def group_advantages(
    rewards: torch.Tensor, *, normalize_by_std: bool = True, epsilon: float = 1e-6
) -> torch.Tensor:
    """Advantages of ``rewards`` ``[groups, group_size]``, relative within each row."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, group_size >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_by_std:
        scaled = centred / (rewards.std(dim=1, keepdim=True) + epsilon)
        centred = torch.where(centred == 0, 0.0, scaled)  # a flat group: 0, also with eps 0
    return centred.float()


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[groups]`` booleans: True where every reward of the group is the same (its
    advantages are all 0, so it adds no policy gradient)."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, ``x = ref_logp - logp``:
    ``k1 = -x``, ``k2 = x^2 / 2``, ``k3 = exp(x) - 1 - x`` (unbiased and always >= 0)."""
    x = ref_logp - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return torch.expm1(x) - x
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


@dataclass(frozen=True, kw_only=True)
class GRPOLossConfig:
    """The options of :func:`grpo_token_loss` (the ``[rl]`` section's names)."""

    clamp_eps_lower: float = 0.2
    clamp_eps_upper: float = 0.2
    dual_clip_c: float | None = None
    kl_beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coeff: float = 0.0
    importance_sampling_correction: bool = False
    importance_sampling_cap: float = 2.0

    @classmethod
    def from_rl(cls, rl: object) -> GRPOLossConfig:
        """The loss options of an ``RLConfig``."""
        return cls(**{name: getattr(rl, name) for name in cls.__dataclass_fields__})


@dataclass
class TokenLoss:
    """Per-token results of :func:`grpo_token_loss`, all shaped like ``logp``."""

    loss: torch.Tensor
    """What to weight and sum (carries the gradient)."""
    ratio: torch.Tensor
    clipped: torch.Tensor
    """Where the ratio clip (or the dual clip) decided the policy term: no gradient flows."""
    importance_weight: torch.Tensor
    truncated: torch.Tensor
    """Where the importance weight was capped."""
    kl: torch.Tensor | None
    entropy: torch.Tensor | None


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    config: GRPOLossConfig,
    *,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> TokenLoss:
    """The GRPO loss of every token (see the module docstring for the formulas)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1 - config.clamp_eps_lower, 1 + config.clamp_eps_upper)
    pg = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if config.dual_clip_c is not None:
        cap = -advantages * config.dual_clip_c
        dual = (advantages < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        clipped = clipped | dual
    weight = torch.ones_like(logp)
    truncated = torch.zeros_like(logp, dtype=torch.bool)
    if config.importance_sampling_correction:
        if rollout_logp is None:
            raise ValueError("the importance-sampling correction needs rollout_logp")
        raw = torch.exp(old_logp - rollout_logp).detach()
        truncated = raw > config.importance_sampling_cap
        weight = raw.clamp(max=config.importance_sampling_cap)
        pg = pg * weight
    loss = pg
    kl = None
    if config.kl_beta > 0:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp (the reference policy's log-probs)")
        kl = kl_penalty(logp, ref_logp, config.kl_estimator)
        loss = loss + config.kl_beta * kl
    if config.entropy_coeff > 0:
        if entropy is None:
            raise ValueError("entropy_coeff > 0 needs the per-token entropy")
        loss = loss - config.entropy_coeff * entropy
    return TokenLoss(loss, ratio.detach(), clipped, weight, truncated, kl, entropy)


def token_loss_weights(
    completion_masks: Sequence[torch.Tensor],
    mode: Aggregation,
    *,
    max_completion_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Per-token weights ``w`` of each sequence of the *global* batch: the loss is
    ``sum over sequences and tokens of w * loss``.

    ``completion_masks[s]`` marks the tokens of sequence ``s`` that are trained on.
    ``token_mean``: ``1 / (completion tokens in the batch)``; ``seq_mean_token_mean``:
    ``1 / (sequences * tokens of this sequence)``; ``dr_grpo``:
    ``1 / (sequences * max_completion_tokens)`` (a constant: longer answers are not
    averaged down, Dr.GRPO's fix of GRPO's length bias).
    """
    masks = [m.float() for m in completion_masks]
    num_seqs = len(masks)
    if num_seqs == 0:
        return []
    if mode == "token_mean":
        total = sum(float(m.sum()) for m in masks)
        return [m / max(total, 1.0) for m in masks]
    if mode == "seq_mean_token_mean":
        return [m / (num_seqs * max(float(m.sum()), 1.0)) for m in masks]
    if mode == "dr_grpo":
        if not max_completion_tokens or max_completion_tokens < 1:
            raise ValueError("dr_grpo aggregation needs max_completion_tokens >= 1")
        return [m / (num_seqs * max_completion_tokens) for m in masks]
    raise ValueError(
        f"loss aggregation must be token_mean, seq_mean_token_mean or dr_grpo, got {mode!r}"
    )


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits / temperature)`` at ``labels``, and optionally the entropy of
    that distribution; ``[..., V]`` logits give ``[...]``.

    ``vocab_size`` drops the rows a model pads its vocabulary with, as the engine's sampler
    never picks them.
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return chosen, entropy
