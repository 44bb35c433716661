"""Straggler detection on real gloo ranks, one of them slow."""

from __future__ import annotations

import pytest

from mcore.core.testing import run_ranks
from mcore.core.training.straggler import StragglerDetector, StragglerReport


def three_ranks_rank_1_slow(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    detector = StragglerDetector(minmax_count=1)
    step_seconds = {0: [1.0, 1.0], 1: [1.4, 1.6], 2: [1.1, 1.1]}[rank]  # means 1.0, 1.5, 1.1
    for seconds in step_seconds:
        detector.record(seconds)
    whole = detector.report()
    after = detector.report()  # a new interval: nothing recorded in it yet

    # A sub-group of ranks 1 and 2 names ranks by their global number; all ranks make it.
    pair = dist.new_group([1, 2])
    sub = None
    if rank in (1, 2):
        detector = StragglerDetector(group=pair, minmax_count=2)
        detector.record(2.0 if rank == 2 else 1.0)
        sub = detector.report()

    off = StragglerDetector(enabled=False)
    off.record(9.0)
    return {"whole": whole, "after": after, "sub": sub, "off": off.report()}


def test_the_slow_rank_is_named_on_every_rank() -> None:
    results = run_ranks(three_ranks_rank_1_slow, 3, backend="gloo")
    reports = [r["whole"] for r in results]
    assert reports[0] == reports[1] == reports[2]
    report = reports[0]
    assert report.seconds == pytest.approx({0: 1.0, 1: 1.5, 2: 1.1})
    assert report.slowest == [(1, pytest.approx(1.5))]
    assert report.fastest == [(0, 1.0)]
    assert (report.min_s, report.max_s, report.median_s) == pytest.approx((1.0, 1.5, 1.1))
    assert report.format() == (
        "stragglers: slowest rank 1 (1.50 s), fastest rank 0 (1.00 s), spread 1.50x"
    )
    assert [r["after"] for r in results] == [None, None, None]
    assert [r["off"] for r in results] == [None, None, None]
    assert results[0]["sub"] is None
    assert results[1]["sub"] == results[2]["sub"]
    assert results[1]["sub"].slowest == [(2, 2.0), (1, 1.0)]


def test_without_a_process_group_this_process_is_rank_0() -> None:
    detector = StragglerDetector(minmax_count=3)
    for seconds in (0.25, 0.75):
        detector.record(seconds)
    assert detector.report() == StragglerReport(
        seconds={0: 0.5}, slowest=[(0, 0.5)], fastest=[(0, 0.5)]
    )


def test_enable_and_disable_switch_recording() -> None:
    detector = StragglerDetector(enabled=False)
    detector.record(5.0)
    assert detector.report() is None
    detector.enable()
    detector.record(1.0)
    detector.record(3.0)
    assert detector.report().seconds == {0: 2.0}
    detector.record(1.0)
    detector.disable()
    detector.enable()
    assert detector.report() is None  # what was recorded before disabling is gone


def test_several_slowest_and_fastest_ranks_read_well() -> None:
    report = StragglerReport(
        seconds={0: 1.0, 1: 1.1, 2: 2.0, 3: 1.9},
        slowest=[(2, 2.0), (3, 1.9)],
        fastest=[(0, 1.0), (1, 1.1)],
    )
    assert report.format() == (
        "stragglers: slowest ranks 2 (2.00 s), 3 (1.90 s), "
        "fastest ranks 0 (1.00 s), 1 (1.10 s), spread 2.00x"
    )
    assert report.median_s == pytest.approx(1.5)
