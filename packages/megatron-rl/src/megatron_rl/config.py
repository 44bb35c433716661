"""The ``[rl]`` config section: rollouts and the GRPO objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcore.core import ConfigErrors


@dataclass(kw_only=True)
class RLConfig:
    """GRPO post-training."""

    prompts_per_step: int = 8
    """Prompts rolled out per training step."""
    group_size: int = 8
    """Completions sampled per prompt; advantages are relative within a group."""
    max_new_tokens: int = 128
    """Longest completion."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    clip_eps_low: float = 0.2
    """Lower clip of the policy ratio (1 - eps)."""
    clip_eps_high: float = 0.2
    """Upper clip of the policy ratio (1 + eps); raise it for clip-higher."""
    kl_beta: float = 0.0
    """Weight of the KL penalty against the frozen reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Estimator of the KL divergence."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "dr_grpo"] = "token_mean"
    """How per-token losses are averaged."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in ("prompts_per_step", "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                errors.add(name, f"must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            errors.add("group_size", "must be >= 2: a group of one has no relative advantage")
        if self.temperature <= 0:
            errors.add("temperature", f"must be > 0, got {self.temperature}")
        for name in ("clip_eps_low", "clip_eps_high", "kl_beta", "entropy_coeff"):
            if getattr(self, name) < 0:
                errors.add(name, f"must be >= 0, got {getattr(self, name)}")
