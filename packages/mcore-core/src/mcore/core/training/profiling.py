"""Profiling ``mcore train``: named ranges, a torch.profiler trace of chosen steps, and the
time start-up takes. The ``[profile]`` config section (:class:`~mcore.core.sections.ProfileConfig`)
drives all three.

    from mcore.core.training.profiling import ranges

    with ranges.range("forward"):      # a shared no-op while the ranges are off
        ...
    with ranges.range("layer", 3):     # "layer 3"; the name is formatted only when on

    profiler = StepProfiler.from_config(config, rank=rank, world_size=world, device=device)
    try:
        for step in range(1, n + 1):
            profiler.step(step)         # closes "step N-1", starts/stops the trace, opens "step N"
            ...
    finally:
        profiler.close()                # closes the open range; writes a trace still recording

    startup = StartupTimes()            # first thing in train()
    startup.mark("build")               # ... each phase's end
    fields = startup.report(rank=rank, world_size=world)  # after the first step: collective

The ranges are one process-wide switch (:data:`ranges`), so code that marks them (the pipeline
schedules, the model's layers, the gradient reduction) needs no config: the loop turns them on
for the whole run (``profile.nvtx_ranges``) or for the traced steps only. A range is a
``torch.autograd.profiler.record_function`` (it shows in a torch.profiler trace on any device)
and, with CUDA, an NVTX range too (Nsight Systems shows it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "PHASES",
    "Ranges",
    "StartupTimes",
    "StepProfiler",
    "format_startup",
    "process_age",
    "ranges",
]

log = logging.getLogger(__name__)

_OFF = contextlib.nullcontext()  # reusable and re-entrant: what every range is while off


class _Range:
    """One named range while the ranges are on: record_function, plus NVTX on CUDA."""

    __slots__ = ("_name", "_nvtx", "_record")

    def __init__(self, name: str, nvtx: bool) -> None:
        self._name = name
        self._nvtx = nvtx
        self._record: Any = None

    def __enter__(self) -> _Range:
        self._record = torch.autograd.profiler.record_function(self._name)
        self._record.__enter__()
        if self._nvtx:
            torch.cuda.nvtx.range_push(self._name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Inner first, in the order they were pushed; an exception leaving the body still pops.
        if self._nvtx:
            torch.cuda.nvtx.range_pop()
        self._record.__exit__(exc_type, exc, tb)


class Ranges:
    """The process-wide switch of mcore's named ranges; :data:`ranges` is the one instance."""

    def __init__(self) -> None:
        self._on = False
        self._nvtx = False

    @property
    def enabled(self) -> bool:
        return self._on

    @property
    def nvtx(self) -> bool:
        """Whether each range is also an NVTX range."""
        return self._on and self._nvtx

    def enable(self, *, nvtx: bool | None = None) -> None:
        """Mark ranges from now on; ``nvtx`` (default: CUDA is available) adds NVTX ranges."""
        self._on = True
        self._nvtx = torch.cuda.is_available() if nvtx is None else nvtx

    def disable(self) -> None:
        """Stop marking ranges (ranges already open still close)."""
        self._on = False

    def state(self) -> tuple[bool, bool]:
        """``(enabled, nvtx)``, for :meth:`set` to put back."""
        return self._on, self._nvtx

    def set(self, enabled: bool, nvtx: bool | None = None) -> None:
        """:meth:`enable` or :meth:`disable` by ``enabled``."""
        if enabled:
            self.enable(nvtx=nvtx)
        else:
            self.disable()

    def range(self, name: str, index: int | None = None) -> contextlib.AbstractContextManager:
        """A context manager marking ``name`` (``"name index"`` when ``index`` is given) while
        its body runs; while off, a shared no-op."""
        if not self._on:
            return _OFF
        return _Range(name if index is None else f"{name} {index}", self._nvtx)


ranges = Ranges()
"""The named ranges' switch: ``with ranges.range("forward"): ...``."""


class StepProfiler:
    """A torch.profiler trace of steps ``[start, end)`` on the ranks in ``ranks``, and the
    ``step N`` range around each step.

    Call :meth:`step` at the top of every step (it ends the previous one) and :meth:`close`
    once after the last. The trace records CPU activity (and CUDA with ``cuda``), with the
    named ranges on while it runs, and goes to ``trace_dir/rank{R}_steps{A}-{B}.json``
    (Chrome trace format; A and B are the first and last step it holds). ``nvtx_ranges``
    turns the ranges on for the whole run, on every rank (NVTX ones with ``cuda``).
    """

    def __init__(
        self,
        *,
        rank: int,
        enabled: bool = False,
        start: int = 10,
        end: int = 12,
        ranks: Iterable[int] = (0,),
        trace_dir: str | Path = "profile",
        record_shapes: bool = False,
        profile_memory: bool = False,
        cuda: bool = False,
        nvtx_ranges: bool = False,
    ) -> None:
        if not 1 <= start < end:
            raise ValueError(f"need 1 <= start < end, got start={start}, end={end}")
        self.rank = rank
        self.start, self.end = start, end
        self.active = enabled and rank in set(ranks)
        """Whether this rank records a trace."""
        self.trace_dir = Path(trace_dir)
        self.record_shapes, self.profile_memory = record_shapes, profile_memory
        self.cuda = cuda
        self.traces: list[Path] = []
        """The traces this rank wrote."""
        self._saved = ranges.state()  # put back by close()
        if nvtx_ranges:
            ranges.enable(nvtx=cuda)
        self._range: contextlib.AbstractContextManager = _OFF  # the open "step N"
        self._profiler: Any = None
        self._window_saved = self._saved
        self._first = self._last = 0

    @classmethod
    def from_config(
        cls, config: Any, *, rank: int, world_size: int, device: torch.device
    ) -> StepProfiler:
        """The profiler ``config.profile`` asks for, on this rank of ``world_size``."""
        p = config.profile
        save = config.checkpoint.save
        trace_dir = p.trace_dir or (str(Path(save) / "profile") if save else "profile")
        if p.profile and rank == 0 and not any(0 <= r < world_size for r in p.profile_ranks):
            log.warning(
                "profile.profile_ranks %s names no rank of this %d-rank run: no trace is written",
                p.profile_ranks, world_size,
            )  # fmt: skip
        return cls(
            rank=rank,
            enabled=p.profile,
            start=p.profile_step_start,
            end=p.profile_step_end,
            ranks=p.profile_ranks,
            trace_dir=trace_dir,
            record_shapes=p.record_shapes,
            profile_memory=p.profile_memory,
            cuda=device.type == "cuda",
            nvtx_ranges=p.nvtx_ranges,
        )

    def step(self, step: int) -> None:
        """Step ``step`` begins: close the previous step's range, stop the trace after its
        last step or start it before its first, and open ``step {step}``."""
        self._range.__exit__(None, None, None)
        if self._profiler is not None and step >= self.end:
            self._stop()
        if self.active and self._profiler is None and self.start <= step < self.end:
            self._start(step)
        self._last = step
        self._range = ranges.range("step", step)
        self._range.__enter__()

    def close(self) -> None:
        """The run ended (or failed): close the open step range, write a trace still being
        recorded (up to the failure, if any), and put the ranges' switch back as it was."""
        self._range.__exit__(None, None, None)
        self._range = _OFF
        if self._profiler is not None:
            try:
                self._stop()
            except Exception as exc:  # in a finally: never hide the error that ended the run
                log.warning("profile: could not write the trace: %s", exc)
                self._profiler = None
        ranges.set(*self._saved)

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(
            activities=activities,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
        )
        profiler.start()
        self._profiler, self._first = profiler, step
        self._window_saved = ranges.state()
        ranges.enable(nvtx=self.cuda)

    def _stop(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        ranges.set(*self._window_saved)
        path = self.trace_dir / f"rank{self.rank}_steps{self._first}-{self._last}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
        self.traces.append(path)
        print(f"profile: rank {self.rank} wrote {path}", flush=True)


def process_age() -> float | None:
    """Seconds since this process started (``/proc/self/stat``), or None where unknown."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # Fields after "(comm)", which may hold spaces: state is field 3, starttime field 22.
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return age if age >= 0 else None


# Start-up phases: (field key, label), each ending at the mark of the same key.
PHASES = (
    ("to_train", "process->train"),
    ("build", "build"),
    ("load_data", "load+data"),
    ("first_step", "first step"),
)


class StartupTimes:
    """How long start-up takes: process start -> ``train()`` -> model built -> checkpoint and
    data loaded -> first step finished, each phase's minimum and maximum over the ranks.

    Made when ``train()`` begins (the ``to_train`` mark); :meth:`mark` ends each later phase
    and :meth:`report` the last; :meth:`take_fields` hands the reported fields over once, for
    the run's first metrics record. Only a process's first one measures ``to_train`` (in a
    second ``train()`` of a notebook or a test it would count the first run). Megatron's
    timers likewise record start-up apart from the steps.
    """

    _measured_in: int | None = None  # the pid whose first StartupTimes measured to_train

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        now = clock()
        first = StartupTimes._measured_in != os.getpid()  # a forked rank is a new process
        StartupTimes._measured_in = os.getpid()
        age = process_age() if first else None
        self._marks: dict[str, float] = {"to_train": now}
        self._process_start = None if age is None else now - age
        self._fields: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """The phase ``phase`` (a key of :data:`PHASES`) ends now."""
        if phase not in dict(PHASES):
            raise ValueError(f"unknown start-up phase {phase!r}; phases: {dict(PHASES)}")
        self._marks[phase] = self._clock()

    def seconds(self) -> dict[str, float]:
        """This rank's seconds per phase marked so far, and ``total`` from process start (or,
        where that is unknown, from ``train()``)."""
        start = self._process_start
        out: dict[str, float] = {}
        previous = start
        for key, _ in PHASES:
            if key not in self._marks:
                continue
            if previous is not None:
                out[key] = self._marks[key] - previous
            previous = self._marks[key]
        first = start if start is not None else self._marks["to_train"]
        out["total"] = previous - first if previous is not None else 0.0
        return out

    def report(self, *, rank: int = 0, world_size: int = 1, group: Any = None) -> dict[str, float]:
        """End the ``first_step`` phase; every phase's min and max over the ranks (one
        all_reduce, collective: every rank calls it), printed by rank 0 as one line; returns
        ``{"startup/<phase>_min_s": ..., "startup/<phase>_max_s": ...}`` on every rank."""
        self.mark("first_step")
        mine = self.seconds()
        lows, highs = _min_max(list(mine.values()), world_size, group)
        fields: dict[str, float] = {}
        for key, lo, hi in zip(mine, lows, highs, strict=True):
            fields[f"startup/{key}_min_s"] = lo
            fields[f"startup/{key}_max_s"] = hi
        if rank == 0:
            print(format_startup(fields, world_size), flush=True)
        self._fields = fields
        return fields

    def take_fields(self) -> dict[str, float]:
        """The fields :meth:`report` returned, the first time it is called after it; then
        ``{}``."""
        fields, self._fields = self._fields, {}
        return fields


def format_startup(fields: dict[str, float], world_size: int = 1) -> str:
    """``startup: process->train 3.20 s, build 1.10 s, ...`` (one rank), or with more ranks
    ``startup (min-max over 8 ranks): process->train 3.10-3.20 s, ...``."""
    labels = {**dict(PHASES), "total": "total"}
    parts = []
    for key, label in labels.items():
        lo, hi = fields.get(f"startup/{key}_min_s"), fields.get(f"startup/{key}_max_s")
        if lo is None or hi is None:
            continue
        parts.append(f"{label} {hi:.2f} s" if world_size == 1 else f"{label} {lo:.2f}-{hi:.2f} s")
    head = "startup" if world_size == 1 else f"startup (min-max over {world_size} ranks)"
    return f"{head}: " + ", ".join(parts)


def _min_max(values: list[float], world_size: int, group: Any) -> tuple[list[float], list[float]]:
    """Each value's minimum and maximum over the ranks: one MAX all_reduce of the values and
    their negatives."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return values, values
    # NCCL moves only CUDA tensors; gloo and the rest take CPU ones.
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
    both = torch.tensor(values + [-v for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = len(values)
    packed = both.tolist()
    return [-v for v in packed[n:]], packed[:n]
