"""The ``[profile]`` section and :mod:`mcore.core.training.profiling`: named ranges that stay
balanced when the body raises, the step profiler's window, ranks and options, and start-up
timing. The loop's use of them is tested in integration-tests/tests/test_profiling.py."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

from mcore.core.config import ConfigError, ConfigErrors, build_config, field_docs, parse_overrides
from mcore.core.sections import CORE_SECTIONS, ProfileConfig
from mcore.core.testing import run_ranks
from mcore.core.training import profiling
from mcore.core.training.profiling import (
    StartupTimes,
    StepProfiler,
    format_startup,
    process_age,
    ranges,
)


@pytest.fixture(autouse=True)
def ranges_off(monkeypatch):
    monkeypatch.setattr(StartupTimes, "_measured_in", None)  # as in a new process
    ranges.disable()
    yield
    ranges.disable()


# --- the [profile] section -------------------------------------------------------------------


def profile_section(**values) -> ProfileConfig:
    return build_config({"profile": values}, CORE_SECTIONS).profile


def test_the_section_is_registered_with_megatrons_defaults_and_every_field_has_help() -> None:
    assert CORE_SECTIONS["profile"] is ProfileConfig
    p = profile_section()
    assert (p.profile, p.profile_step_start, p.profile_step_end, p.profile_ranks) == (
        False, 10, 12, [0],
    )  # fmt: skip
    assert not (p.nvtx_ranges or p.record_shapes or p.profile_memory) and p.trace_dir is None
    docs = field_docs(ProfileConfig)
    assert {f.name for f in dataclasses.fields(ProfileConfig)} == set(docs)
    assert all(len(text) > 20 for text in docs.values())


def test_command_line_values_parse() -> None:
    errors = ConfigErrors()
    values = parse_overrides(
        ["profile.profile=true", "profile.profile-ranks=0,3", "profile.profile-step-start=2"],
        CORE_SECTIONS,
        errors,
    )
    p = build_config(values, CORE_SECTIONS, errors=errors).profile
    assert (p.profile, p.profile_ranks, p.profile_step_start) == (True, [0, 3], 2)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"profile_step_start": 0}, "profile.profile_step_start: must be >= 1"),
        ({"profile_step_start": 5, "profile_step_end": 5}, "profile.profile_step_end: must be > "),
        ({"profile_step_start": 6, "profile_step_end": 5}, "profile.profile_step_end: must be > "),
        ({"profile_ranks": [0, -1]}, "profile.profile_ranks: ranks must be >= 0, got [-1]"),
    ],
)
def test_validation(values, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        profile_section(**values)


def test_traces_go_beside_the_checkpoints_by_default(tmp_path) -> None:
    def trace_dir(**checkpoint) -> Path:
        config = build_config({"profile": {}, "checkpoint": checkpoint}, CORE_SECTIONS)
        return StepProfiler.from_config(
            config, rank=0, world_size=1, device=torch.device("cpu")
        ).trace_dir

    assert trace_dir() == Path("profile")
    assert trace_dir(save=str(tmp_path)) == tmp_path / "profile"
    config = build_config({"profile": {"trace_dir": "/x/t"}}, CORE_SECTIONS)
    cpu = torch.device("cpu")
    assert StepProfiler.from_config(config, rank=0, world_size=1, device=cpu).trace_dir == Path(
        "/x/t"
    )


# --- ranges ----------------------------------------------------------------------------------


class RecordedStack:
    """Stands in for NVTX and record_function, keeping the stack each one pushes."""

    def __init__(self, monkeypatch) -> None:
        self.nvtx: list[str] = []
        self.records: list[str] = []
        self.popped: list[str] = []
        stack = self

        class Record:
            def __init__(self, name: str) -> None:
                self.name = name

            def __enter__(self):
                stack.records.append(self.name)

            def __exit__(self, *exc):
                assert stack.records.pop() == self.name
                stack.popped.append(self.name)

        monkeypatch.setattr(torch.autograd.profiler, "record_function", Record)
        monkeypatch.setattr(torch.cuda.nvtx, "range_push", self.nvtx.append)
        monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: self.nvtx.pop())


def test_off_every_range_is_one_shared_no_op(monkeypatch) -> None:
    stack = RecordedStack(monkeypatch)
    assert ranges.range("a") is ranges.range("layer", 3)
    with ranges.range("a"), ranges.range("b", 1):
        pass
    assert stack.popped == []


def test_nested_ranges_stay_balanced_when_the_body_raises(monkeypatch) -> None:
    stack = RecordedStack(monkeypatch)
    ranges.enable(nvtx=True)

    def nested() -> None:
        with ranges.range("step", 2), ranges.range("forward"), ranges.range("layer", 1):
            assert stack.nvtx == stack.records == ["step 2", "forward", "layer 1"]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        nested()
    assert stack.nvtx == [] and stack.records == []
    assert stack.popped == ["layer 1", "forward", "step 2"]  # innermost first
    ranges.enable(nvtx=False)  # record_function alone
    with ranges.range("optimizer"):
        assert stack.nvtx == [] and stack.records == ["optimizer"]


def test_real_ranges_close_on_exceptions_in_a_torch_profiler_trace(tmp_path) -> None:
    ranges.enable(nvtx=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with pytest.raises(ValueError), ranges.range("outer"), ranges.range("inner"):
            raise ValueError
        with ranges.range("after"):
            torch.ones(4).sum()
    prof.export_chrome_trace(str(tmp_path / "t.json"))
    events = {e["name"]: e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
    outer, inner, after = events["outer"], events["inner"], events["after"]
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert after["ts"] >= outer["ts"] + outer["dur"]  # "outer" closed before "after" opened


# --- the step profiler -----------------------------------------------------------------------


def run_steps(profiler: StepProfiler, steps: range, seen: dict | None = None) -> None:
    for step in steps:
        profiler.step(step)
        if seen is not None:
            seen[step] = ranges.enabled
        with ranges.range("work"):
            torch.randn(32, 32) @ torch.randn(32, 32)
    profiler.close()


def trace_events(path: Path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]


def test_the_trace_holds_steps_start_to_end_minus_one_with_the_ranges_on_only_then(
    tmp_path,
) -> None:
    seen: dict[int, bool] = {}
    profiler = StepProfiler(rank=0, enabled=True, start=2, end=4, trace_dir=tmp_path)
    run_steps(profiler, range(1, 6), seen)
    assert profiler.traces == [tmp_path / "rank0_steps2-3.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["rank0_steps2-3.json"]
    names = {e["name"] for e in trace_events(profiler.traces[0])}
    assert {"step 2", "step 3", "work", "aten::mm"} <= names
    assert not {"step 1", "step 4"} & names
    assert seen == {1: False, 2: True, 3: True, 4: False, 5: False}
    assert not ranges.enabled
    events = trace_events(profiler.traces[0])
    assert not any("Input Dims" in e.get("args", {}) for e in events)
    assert not any(e["name"] == "[memory]" for e in events)


def test_record_shapes_and_profile_memory_reach_the_trace(tmp_path) -> None:
    profiler = StepProfiler(
        rank=0, enabled=True, start=1, end=2, trace_dir=tmp_path,
        record_shapes=True, profile_memory=True,
    )  # fmt: skip
    run_steps(profiler, range(1, 3))
    events = trace_events(tmp_path / "rank0_steps1-1.json")
    mm = [e for e in events if e["name"] == "aten::mm"]
    assert mm and mm[0]["args"]["Input Dims"] == [[32, 32], [32, 32]]
    assert any(e["name"] == "[memory]" for e in events)


def test_only_the_chosen_ranks_record(tmp_path) -> None:
    seen: dict[int, bool] = {}
    run_steps(
        StepProfiler(rank=1, enabled=True, start=1, end=3, ranks=[0, 2], trace_dir=tmp_path),
        range(1, 4),
        seen,
    )
    assert list(tmp_path.iterdir()) == [] and not any(seen.values())
    off = StepProfiler(rank=0, enabled=False, start=1, end=3, trace_dir=tmp_path)
    run_steps(off, range(1, 4), seen)
    assert list(tmp_path.iterdir()) == [] and not any(seen.values())


def test_a_run_that_stops_inside_the_window_still_writes_what_it_recorded(tmp_path) -> None:
    profiler = StepProfiler(rank=0, enabled=True, start=2, end=10, trace_dir=tmp_path)
    with pytest.raises(RuntimeError):
        try:
            for step in range(1, 20):
                profiler.step(step)
                with ranges.range("work"):
                    if step == 3:
                        raise RuntimeError("the step failed")
        finally:
            profiler.close()
    names = {e["name"] for e in trace_events(tmp_path / "rank0_steps2-3.json")}
    assert {"step 2", "step 3", "work"} <= names
    assert not ranges.enabled


def test_nvtx_ranges_mark_every_step_and_the_switch_is_restored(monkeypatch, tmp_path) -> None:
    stack = RecordedStack(monkeypatch)
    seen: dict[int, bool] = {}
    profiler = StepProfiler(rank=3, nvtx_ranges=True, cuda=True, trace_dir=tmp_path)
    run_steps(profiler, range(1, 4), seen)
    assert seen == {1: True, 2: True, 3: True}
    assert stack.popped == ["work", "step 1", "work", "step 2", "work", "step 3"]
    assert stack.nvtx == [] and not ranges.enabled
    assert list(tmp_path.iterdir()) == []  # ranges alone write no trace


def test_on_cuda_the_trace_adds_cuda_activity_and_the_ranges_nvtx(monkeypatch, tmp_path) -> None:
    calls: list[str] = []

    class FakeProfile:
        def __init__(self, *, activities, record_shapes, profile_memory) -> None:
            calls.append(f"activities {sorted(a.name for a in activities)}")

        def start(self) -> None:
            calls.append("start")

        def stop(self) -> None:
            calls.append("stop")

        def export_chrome_trace(self, path: str) -> None:
            Path(path).write_text("{}")

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    stack = RecordedStack(monkeypatch)
    profiler = StepProfiler(rank=0, enabled=True, start=2, end=3, trace_dir=tmp_path, cuda=True)
    for step in (1, 2, 3):
        profiler.step(step)
        calls.append(f"step {step} nvtx {stack.nvtx}")
    profiler.close()
    assert calls == [
        "step 1 nvtx []",
        "activities ['CPU', 'CUDA']",
        "start",
        "step 2 nvtx ['step 2']",
        "stop",
        "step 3 nvtx []",
    ]
    assert (tmp_path / "rank0_steps2-2.json").exists()


# --- start-up timing -------------------------------------------------------------------------


def test_process_age_counts_from_process_start() -> None:
    # A forked child starts at the fork: its age after sleeping 0.3 s is about 0.3 s.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: pure Python only, then leave without pytest's teardown
        time.sleep(0.3)
        os.write(write, str(process_age()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    age = float(os.read(read, 100).decode())
    os.close(read)
    assert 0.3 - 0.02 <= age < 2.0  # starttime counts in 10 ms ticks
    assert 0 < process_age() < 10 * 24 * 3600


def test_phases_run_from_process_start_to_the_first_step(monkeypatch, capsys) -> None:
    now = iter([100.0, 101.5, 101.75, 103.0])
    monkeypatch.setattr(profiling, "process_age", lambda: 4.0)
    startup = StartupTimes(clock=lambda: next(now))
    startup.mark("build")
    startup.mark("load_data")
    fields = startup.report(rank=0, world_size=1)
    assert fields == {
        f"startup/{key}_{m}_s": value
        for key, value in {
            "to_train": 4.0, "build": 1.5, "load_data": 0.25, "first_step": 1.25, "total": 7.0,
        }.items()
        for m in ("min", "max")
    }  # fmt: skip
    assert capsys.readouterr().out == (
        "startup: process->train 4.00 s, build 1.50 s, load+data 0.25 s, first step 1.25 s, "
        "total 7.00 s\n"
    )
    assert startup.take_fields() == fields and startup.take_fields() == {}


def test_without_a_process_start_the_first_phase_is_left_out(monkeypatch, capsys) -> None:
    now = iter([10.0, 11.0, 12.0])
    monkeypatch.setattr(profiling, "process_age", lambda: None)
    startup = StartupTimes(clock=lambda: next(now))
    startup.mark("build")
    assert startup.report(rank=1) == {
        "startup/build_min_s": 1.0, "startup/build_max_s": 1.0,
        "startup/first_step_min_s": 1.0, "startup/first_step_max_s": 1.0,
        "startup/total_min_s": 2.0, "startup/total_max_s": 2.0,
    }  # fmt: skip
    assert capsys.readouterr().out == ""  # only rank 0 prints
    with pytest.raises(ValueError, match="unknown start-up phase"):
        startup.mark("warmup")


def test_only_a_processs_first_run_times_process_start(monkeypatch) -> None:
    monkeypatch.setattr(profiling, "process_age", lambda: 4.0)
    clock = iter(range(100)).__next__
    first, second = StartupTimes(clock=clock), StartupTimes(clock=clock)
    assert "to_train" in first.seconds() and "to_train" not in second.seconds()
    assert second.seconds() == {"total": 0.0}


def test_the_line_shows_min_and_max_over_ranks() -> None:
    fields = {"startup/build_min_s": 1.0, "startup/build_max_s": 1.25}
    line = format_startup(fields, world_size=8)
    assert line == "startup (min-max over 8 ranks): build 1.00-1.25 s"


def startup_on_rank(rank: int, world_size: int) -> dict[str, float]:
    now = iter([0.0, 1.0 + rank, 2.0 + rank, 2.5 + 2 * rank])  # rank r builds in 1 + r s
    profiling.process_age = lambda: 0.5  # a forked rank: its own module state
    startup = StartupTimes(clock=lambda: next(now))
    startup.mark("build")
    startup.mark("load_data")
    return startup.report(rank=rank, world_size=world_size)


def test_each_phase_is_reduced_to_its_min_and_max_over_the_ranks(capfd) -> None:
    results = run_ranks(startup_on_rank, 2, backend="gloo")
    assert results[0] == results[1]
    fields = results[0]
    assert (fields["startup/build_min_s"], fields["startup/build_max_s"]) == (1.0, 2.0)
    assert (fields["startup/first_step_min_s"], fields["startup/first_step_max_s"]) == (0.5, 1.5)
    assert (fields["startup/total_min_s"], fields["startup/total_max_s"]) == (3.0, 5.0)
    assert fields["startup/to_train_min_s"] == fields["startup/to_train_max_s"] == 0.5
    out = capfd.readouterr().out
    assert out.count("startup (min-max over 2 ranks): ") == 1  # rank 0 alone prints
    assert "build 1.00-2.00 s" in out
