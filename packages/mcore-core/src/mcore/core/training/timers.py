"""Named wall-clock timers for the phases of a training step, averaged per step.

    timers = Timers()
    with timers("forward-backward"):
        ...
    timers("optimizer").start(); ...; timers("optimizer").stop()
    timers.step_end()
    timers.summary(["forward-backward", "optimizer"])   # {"forward-backward": 812.4, ...} in ms

The first step's times are discarded from the averages: it pays for allocator warm-up, kernel
autotuning and lazy initialisation, and would skew every mean after it. ``inject`` feeds a time
measured elsewhere (a CUDA event, another process, a test) as if a timer had run that long.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from types import TracebackType


def _cuda_synchronize() -> None:
    """Wait for queued CUDA kernels so a wall-clock reading covers them; no-op without CUDA."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """One named timer; made by ``Timers(name)``. Start/stop may repeat within a step and add up."""

    def __init__(self, name: str, clock: Callable[[], float], cuda_sync: bool) -> None:
        self.name = name
        self._clock = clock
        self._cuda_sync = cuda_sync
        self._started_at: float | None = None
        self._since_read = 0.0  # what elapsed() returns
        self._this_step = 0.0  # what step_end() records
        self._touched = False  # started or injected during the current step

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def start(self) -> Timer:
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} is already running; stop() it first")
        if self._cuda_sync:
            _cuda_synchronize()
        self._touched = True
        self._started_at = self._clock()
        return self

    def stop(self) -> float:
        """Stop the timer; returns the seconds of this start/stop segment."""
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} was stopped without being started")
        if self._cuda_sync:
            _cuda_synchronize()
        seconds = self._clock() - self._started_at
        self._started_at = None
        self._add(seconds)
        return seconds

    def _add(self, seconds: float) -> None:
        self._since_read += seconds
        self._this_step += seconds
        self._touched = True

    def __enter__(self) -> Timer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Timers:
    """Named timers with per-step means that leave out the first ``warmup_steps`` steps.

    ``cuda_sync=True`` synchronises CUDA at every start and stop, so a timer measures the GPU
    work it encloses rather than how long launching it took; it costs a pipeline drain each
    time, which is why it is off by default.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        *,
        cuda_sync: bool = False,
        warmup_steps: int = 1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self._clock = clock
        self._cuda_sync = cuda_sync
        self._warmup_steps = warmup_steps
        self._timers: dict[str, Timer] = {}
        self._history: dict[str, list[float]] = {}
        self.steps = 0
        """Steps closed by ``step_end`` so far, warm-up included."""

    def __call__(self, name: str) -> Timer:
        """The timer called ``name``, made on first use."""
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = Timer(name, self._clock, self._cuda_sync)
        return timer

    def inject(self, name: str, seconds: float) -> None:
        """Count ``seconds`` for ``name`` in the current step, as if its timer had run that long."""
        if seconds < 0:
            raise ValueError(f"timer {name!r}: cannot inject a negative time ({seconds} s)")
        self(name)._add(seconds)

    def elapsed(self, name: str, reset: bool = True) -> float:
        """Seconds ``name`` has accumulated since the last resetting read (a running timer's
        current segment included); independent of ``step_end`` and the warm-up rule."""
        timer = self(name)
        if timer._started_at is not None:
            # Bank the running segment so far and keep timing from now.
            now = self._clock()
            timer._add(now - timer._started_at)
            timer._started_at = now
        seconds = timer._since_read
        if reset:
            timer._since_read = 0.0
        return seconds

    def step_end(self) -> None:
        """Close a step: every timer used in it records its total (unless the step is warm-up).

        A timer still running keeps running; its time counts in the step in which it stops.
        """
        warmup = self.steps < self._warmup_steps
        for name, timer in self._timers.items():
            if timer._touched and not warmup:
                self._history.setdefault(name, []).append(timer._this_step)
            timer._this_step = 0.0
            timer._touched = timer.running
        self.steps += 1

    def summary(
        self, names: Iterable[str] | None = None, *, reset: bool = False
    ) -> dict[str, float]:
        """Mean milliseconds per step of each named timer (all when ``names`` is None).

        Timers with no step recorded yet (all their steps were warm-up) are left out.
        ``reset=True`` forgets the recorded steps, so the next summary covers only what
        follows: per-log-interval means.
        """
        wanted = list(self._history) if names is None else list(names)
        out = {
            name: 1000.0 * sum(self._history[name]) / len(self._history[name])
            for name in wanted
            if self._history.get(name)
        }
        if reset:
            self._history.clear()
        return out

    def format(self, names: Iterable[str] | None = None, *, reset: bool = False) -> str:
        """``summary`` as one log line: ``time (ms) | forward-backward 812.4 | optimizer 3.1``."""
        means = self.summary(names, reset=reset)
        return " | ".join(["time (ms)", *(f"{name} {ms:.1f}" for name, ms in means.items())])
