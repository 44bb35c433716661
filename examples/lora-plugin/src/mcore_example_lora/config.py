"""The ``[lora]`` config section. Plain dataclass, no torch: loading plugins stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcore.core import ConfigErrors

Target = Literal["linear_proj", "linear_fc2"]
TARGETS: tuple[str, ...] = ("linear_proj", "linear_fc2")


@dataclass(kw_only=True)
class LoRAConfig:
    """LoRA: train low-rank adapters on a frozen model (the example-lora plugin)."""

    rank: int = 0
    """Rank r of the update added to every target layer, which then computes
    W x + (alpha / r) B A x with A [r, in] (random) and B [out, r] (zeros, so training starts
    from the unchanged model). 0 turns LoRA off; above 0 every weight of the model is frozen
    and only the adapters train."""
    alpha: float = 8.0
    """Scale of the update: B A x is multiplied by alpha / rank (PEFT's lora_alpha)."""
    targets: tuple[Target, ...] = TARGETS
    """Which linear layers of every transformer layer get an adapter: 'linear_proj' (the
    attention output projection) and/or 'linear_fc2' (the MLP down projection, also of MoE
    shared experts; routed experts are not adapted)."""

    def validate(self, errors: ConfigErrors) -> None:
        if self.rank < 0:
            errors.add("rank", f"must be >= 0 (0 turns LoRA off), got {self.rank}")
        if self.alpha <= 0:
            errors.add("alpha", f"must be > 0, got {self.alpha}")
        if not self.targets:
            errors.add("targets", f"name at least one layer ({', '.join(TARGETS)})")
        if len(set(self.targets)) != len(self.targets):
            errors.add("targets", f"names a layer twice: {list(self.targets)}")
