"""Timers as the training loop uses them, on a fake clock so every number is exact."""

from __future__ import annotations

import pytest

from mcore.core.training.timers import Timers


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_the_first_step_is_left_out_of_the_means() -> None:
    clock = FakeClock()
    timers = Timers(clock)
    for seconds in (5.0, 0.2, 0.4):  # a slow warm-up step, then two ordinary ones
        with timers("forward-backward"):
            clock.advance(seconds)
        timers.step_end()
    assert timers.summary(["forward-backward"]) == pytest.approx({"forward-backward": 300.0})


def test_segments_within_a_step_add_up() -> None:
    clock = FakeClock()
    timers = Timers(clock, warmup_steps=0)
    for _ in range(4):  # four micro-batches
        timers("forward").start()
        clock.advance(0.01)
        timers("forward").stop()
    timers.step_end()
    assert timers.summary() == pytest.approx({"forward": 40.0})


def test_injected_times_count_like_measured_ones() -> None:
    timers = Timers(FakeClock())
    for seconds in (9.0, 0.1, 0.3):
        timers.inject("optimizer", seconds)
        timers.step_end()
    assert timers.summary(["optimizer"]) == pytest.approx({"optimizer": 200.0})
    assert timers.format(["optimizer"]) == "time (ms) | optimizer 200.0"


def test_elapsed_reads_and_resets_independently_of_steps() -> None:
    clock = FakeClock()
    timers = Timers(clock, warmup_steps=0)
    timers("iteration").start()
    clock.advance(2.0)
    assert timers.elapsed("iteration") == pytest.approx(2.0)  # read while running
    clock.advance(1.0)
    timers("iteration").stop()
    assert timers.elapsed("iteration", reset=False) == pytest.approx(1.0)
    assert timers.elapsed("iteration") == pytest.approx(1.0)
    assert timers.elapsed("iteration") == 0.0
    timers.step_end()
    assert timers.summary() == pytest.approx({"iteration": 3000.0})  # the step saw all of it


def test_summary_reset_gives_per_interval_means_and_skips_unused_timers() -> None:
    timers = Timers(FakeClock(), warmup_steps=0)
    timers.inject("step", 1.0)
    timers.step_end()
    assert timers.summary(["step", "never-used"], reset=True) == pytest.approx({"step": 1000.0})
    timers.inject("step", 3.0)
    timers.step_end()
    timers.step_end()  # a step in which the timer did not run does not dilute its mean
    assert timers.summary() == pytest.approx({"step": 3000.0})


def test_only_warm_up_steps_means_no_summary_yet() -> None:
    timers = Timers(FakeClock())
    timers.inject("step", 1.0)
    timers.step_end()
    assert timers.summary() == {}


def test_misuse_is_named() -> None:
    timers = Timers(FakeClock())
    with pytest.raises(RuntimeError, match="'fwd' was stopped without being started"):
        timers("fwd").stop()
    timers("fwd").start()
    with pytest.raises(RuntimeError, match="'fwd' is already running"):
        timers("fwd").start()
    with pytest.raises(ValueError, match="negative"):
        timers.inject("fwd", -1.0)


def test_cuda_sync_is_harmless_without_a_gpu() -> None:
    clock = FakeClock()
    timers = Timers(clock, cuda_sync=True, warmup_steps=0)
    with timers("forward"):
        clock.advance(0.5)
    timers.step_end()
    assert timers.summary() == pytest.approx({"forward": 500.0})
