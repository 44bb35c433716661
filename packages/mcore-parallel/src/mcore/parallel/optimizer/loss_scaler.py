"""Dynamic loss scaling for fp16 training.

fp16 has a narrow range: small gradients underflow to zero. Multiplying the loss by a large
scale before backward lifts them into range; the optimizer divides the gradients by the same
scale before using them. The scale is chosen dynamically: halved when a step overflows (the
step is skipped), doubled after ``growth_interval`` clean steps, as in Megatron-Core (with its
``hysteresis``: how many overflowing steps in a row it takes to back off).
"""

from __future__ import annotations

from typing import Any


class DynamicLossScaler:
    """Loss scale that backs off on overflow and grows back after a run of clean steps."""

    def __init__(
        self,
        *,
        initial_scale: float = 2.0**16,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ) -> None:
        if initial_scale <= 0 or min_scale <= 0:
            raise ValueError(
                f"loss scales must be > 0, got initial_scale={initial_scale}, min_scale={min_scale}"
            )
        if growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ValueError(
                f"need growth_factor > 1 and 0 < backoff_factor < 1, got {growth_factor} and "
                f"{backoff_factor}"
            )
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(
                f"growth_interval and hysteresis must be >= 1, got {growth_interval} and "
                f"{hysteresis}"
            )
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._clean_steps = 0
        self._hysteresis_left = hysteresis

    def update(self, found_inf: bool) -> None:
        """Account for one step: back off after ``hysteresis`` overflows, grow after
        ``growth_interval`` clean steps."""
        if found_inf:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps == self.growth_interval:
                self._clean_steps = 0
                self._hysteresis_left = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "clean_steps": self._clean_steps,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])
