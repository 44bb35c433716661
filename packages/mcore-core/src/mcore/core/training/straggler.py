"""Find ranks that run slower than the rest: each rank records its step times, and a
collective ``report`` gathers every rank's mean and names the slowest and fastest.

    detector = StragglerDetector(group=None, minmax_count=1, enabled=True)
    for step in ...:
        detector.record(step_seconds)
        if step % log_interval == 0:
            report = detector.report()          # every rank of the group must call it
            if report and rank == 0:
                print(report.format())

In a synchronous data-parallel job every rank waits for the slowest at each collective, so the
gathered time is of the work a rank does *between* collectives, best measured by the caller
around compute alone; a full step time shows a straggler less sharply but still names it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StragglerReport:
    """Per-rank mean step times of one reporting interval, with the extremes named."""

    seconds: dict[int, float]
    """Mean step time of each rank (global rank) that recorded steps in the interval."""
    slowest: list[tuple[int, float]]
    """The ``minmax_count`` slowest ranks as (rank, seconds), slowest first."""
    fastest: list[tuple[int, float]]
    """The ``minmax_count`` fastest ranks as (rank, seconds), fastest first."""

    @property
    def min_s(self) -> float:
        return self.fastest[0][1]

    @property
    def max_s(self) -> float:
        return self.slowest[0][1]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds.values())

    @property
    def spread(self) -> float:
        """Slowest over fastest mean step time: 1.0 when all ranks keep pace."""
        return self.max_s / self.min_s if self.min_s > 0 else math.inf

    def format(self) -> str:
        """``stragglers: slowest rank 3 (1.52 s), fastest rank 0 (1.01 s), spread 1.50x``."""

        def ranks(label: str, entries: list[tuple[int, float]]) -> str:
            noun = "rank" if len(entries) == 1 else "ranks"
            listed = ", ".join(f"{rank} ({seconds:.2f} s)" for rank, seconds in entries)
            return f"{label} {noun} {listed}"

        return (
            f"stragglers: {ranks('slowest', self.slowest)}, {ranks('fastest', self.fastest)}, "
            f"spread {self.spread:.2f}x"
        )


class StragglerDetector:
    """Per-rank step timing, gathered across ``group`` (default: the whole world) on demand.

    ``enabled`` is the switch (:meth:`enable` / :meth:`disable` at run time; ``mcore train``
    sets it from ``straggler.log_straggler``). While disabled, ``record`` drops times and
    ``report`` returns None without communicating, so every rank of the group must share the
    same switch state.
    """

    def __init__(self, *, group: Any = None, minmax_count: int = 1, enabled: bool = True) -> None:
        if minmax_count < 1:
            raise ValueError(f"minmax_count must be >= 1, got {minmax_count}")
        self.group = group
        self.minmax_count = minmax_count
        self.enabled = enabled
        self._total = 0.0
        self._count = 0

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        """Stop recording and reporting; times recorded so far are dropped."""
        self.enabled = False
        self._total, self._count = 0.0, 0

    def record(self, step_seconds: float) -> None:
        """Add one step's time (seconds) of this rank to the current interval."""
        if self.enabled:
            self._total += step_seconds
            self._count += 1

    def report(self) -> StragglerReport | None:
        """Gather every rank's mean step time since the last report and start a new interval.

        Collective over the group: every rank calls it and every rank gets the same report.
        None when disabled or when no rank recorded a step. Without an initialised process
        group it reports this process alone, as rank 0.
        """
        if not self.enabled:
            return None
        mean = self._total / self._count if self._count else math.nan
        self._total, self._count = 0.0, 0
        seconds = {
            rank: value for rank, value in self._gather(mean).items() if not math.isnan(value)
        }
        if not seconds:
            return None
        ordered = sorted(seconds.items(), key=lambda item: (item[1], item[0]))
        n = min(self.minmax_count, len(ordered))
        return StragglerReport(seconds=seconds, slowest=ordered[::-1][:n], fastest=ordered[:n])

    def _gather(self, mean: float) -> dict[int, float]:
        """Every rank's ``mean`` by global rank (all_gather of a one-element tensor)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return {0: mean}
        # NCCL moves only CUDA tensors; gloo and the rest take CPU ones.
        on_gpu = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        local = torch.tensor([mean], dtype=torch.float64, device=device)
        size = dist.get_world_size(self.group)
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local, group=self.group)
        ranks = (
            range(size)
            if self.group is None
            else [dist.get_global_rank(self.group, i) for i in range(size)]
        )
        return dict(zip(ranks, torch.cat(gathered).tolist(), strict=True))
