"""The learning-rate schedule: linear warmup, then constant, linear, cosine or WSD decay to
``min_lr``, with Megatron-Core's formulas so that a Megatron recipe gives the same curve.

The LR at step ``n`` (the number of optimizer steps taken so far):

- ``n <= warmup_iters`` (with warmup): ``init_lr + (max_lr - init_lr) * n / warmup_iters``;
- ``constant``: ``max_lr`` after warmup;
- ``n > decay_iters``: ``min_lr``;
- otherwise ``min_lr + coeff * (max_lr - min_lr)`` where, with
  ``r = (n - warmup_iters) / (decay_iters - warmup_iters)``, ``coeff`` is ``1 - r`` (linear),
  ``(1 + cos(pi r)) / 2`` (cosine), or for WSD (warmup-stable-decay) ``1`` until the last
  ``wsd_decay_iters`` steps before ``decay_iters`` and then a decay over those steps by
  ``wsd_decay_style`` (exponential by default, as in Megatron; or linear, cosine, minus_sqrt).
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class _HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


class OptimizerParamScheduler:
    """Sets ``lr`` in every param group of ``optimizer`` from the step count.

    The LR for step 0 is set at construction; call :meth:`step` after each optimizer step.
    """

    def __init__(
        self,
        optimizer: _HasParamGroups,
        *,
        max_lr: float,
        min_lr: float = 0.0,
        warmup_iters: int = 0,
        decay_iters: int,
        decay_style: str = "cosine",
        wsd_decay_iters: int | None = None,
        wsd_decay_style: str = "exponential",
        init_lr: float = 0.0,
    ) -> None:
        problems = []
        if not 0.0 <= min_lr <= max_lr:
            problems.append(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        if not 0.0 <= init_lr <= max_lr:
            problems.append(f"need 0 <= init_lr <= max_lr, got init_lr={init_lr}")
        if decay_iters < 1 or not 0 <= warmup_iters < decay_iters:
            problems.append(
                f"need 0 <= warmup_iters < decay_iters, got warmup_iters={warmup_iters}, "
                f"decay_iters={decay_iters}"
            )
        if decay_style not in DECAY_STYLES:
            problems.append(f"decay_style must be one of {DECAY_STYLES}, got {decay_style!r}")
        if decay_style == "WSD":
            if wsd_decay_iters is None or not 0 < wsd_decay_iters <= decay_iters:
                problems.append(
                    f"WSD needs 0 < wsd_decay_iters <= decay_iters ({decay_iters}), got "
                    f"{wsd_decay_iters}"
                )
            if wsd_decay_style not in WSD_DECAY_STYLES:
                problems.append(
                    f"wsd_decay_style must be one of {WSD_DECAY_STYLES}, got {wsd_decay_style!r}"
                )
        if problems:
            raise ValueError("learning-rate schedule: " + "; ".join(problems))
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), float(min_lr), float(init_lr)
        self.warmup_iters, self.decay_iters = warmup_iters, decay_iters
        self.decay_style = decay_style
        self.wsd_decay_iters, self.wsd_decay_style = wsd_decay_iters, wsd_decay_style
        self.num_steps = 0
        self._apply()

    def get_lr(self, step: int | None = None) -> float:
        """The LR after ``step`` optimizer steps (default: the steps taken so far)."""
        n = self.num_steps if step is None else step
        if self.warmup_iters > 0 and n <= self.warmup_iters:
            return self.init_lr + (self.max_lr - self.init_lr) * n / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_iters:
            return self.min_lr
        ratio = (n - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            assert self.wsd_decay_iters is not None
            anneal_start = self.decay_iters - self.wsd_decay_iters
            if n <= anneal_start:
                coeff = 1.0
            else:
                r = (n - anneal_start) / self.wsd_decay_iters
                coeff = {
                    "exponential": 2.0 * 0.5**r - 1.0,
                    "linear": 1.0 - r,
                    "cosine": 0.5 * (math.cos(math.pi * r) + 1.0),
                    "minus_sqrt": 1.0 - math.sqrt(r),
                }[self.wsd_decay_style]
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` optimizer steps and set the new LR; returns it."""
        self.num_steps += increment
        return self._apply()

    def _apply(self) -> float:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()


def build_lr_scheduler(optimizer: _HasParamGroups, config: Any) -> OptimizerParamScheduler:
    """The schedule of a run's ``[optimizer]`` section (``lr_decay_iters`` defaults to
    ``train.train_iters``)."""
    opt = config.optimizer
    decay_iters = opt.lr_decay_iters
    if decay_iters is None:
        decay_iters = config.train.train_iters
    try:
        return OptimizerParamScheduler(
            optimizer,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            warmup_iters=opt.lr_warmup_iters,
            decay_iters=decay_iters,
            decay_style=opt.lr_decay_style,
            wsd_decay_iters=opt.lr_wsd_decay_iters,
        )
    except ValueError as exc:
        fields = (
            "optimizer.lr, min_lr, lr_warmup_iters, lr_decay_iters (default train.train_iters), "
            "lr_decay_style, lr_wsd_decay_iters"
        )
        raise ValueError(f"{exc} (set by {fields})") from None
