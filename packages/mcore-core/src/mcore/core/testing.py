"""Run a function on N real ranks of a torch.distributed process group: the one helper that
distributed tests use (gloo on CPU, NCCL when there is a GPU per rank).

``run_ranks(fn, 4, x)`` starts four processes, calls ``fn(rank, world_size, x)`` in each after
``init_process_group``, and returns the four results in rank order; an exception on any rank is
raised here with that rank's traceback.

``pytest_in_child`` / ``check_pytest_child`` run some of a test file's tests in a fresh
interpreter with extra environment variables, for settings a library reads once at import
(Triton's ``TRITON_INTERPRET``). ``served`` runs a server command (``mcore serve ...``) for the
length of a ``with`` block; ``randomise_weights`` gives a module weights a comparison would
catch misplaced.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from mcore.core.errors import McoreError


class RankError(McoreError):
    """A rank raised or died; the message carries its traceback or exit code."""


def _default_start_method() -> str:
    # fork lets tests pass local functions and closures; spawn is the only safe choice on macOS.
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _threads_per_rank(method: str, world_size: int) -> int:
    """Intra-op threads for each rank: the cores shared out, or one when forking a parent that
    already runs threads. OpenMP's worker pool does not survive fork: a forked child that runs
    a parallel region after the parent started the pool waits forever on workers it lacks."""
    if method == "fork" and _running_threads() > 1:
        return 1
    return max(1, (os.cpu_count() or 1) // world_size)


def _running_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no procfs: assume the worst
        return 2


def _resolve_backend(backend: str, world_size: int) -> str:
    if backend != "auto":
        return backend
    import torch

    usable = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    return "nccl" if usable else "gloo"


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    store_path: str,
    timeout_s: float,
    threads: int,
    results: Any,
    args: tuple,
    kwargs: dict,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            out = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: the queue's own pickler would hand tensors over as shared memory
        # that vanishes when this process exits before the parent reads it.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "auto",
    timeout_s: float = 120.0,
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; results by rank.

    ``backend="auto"`` picks NCCL when there is a GPU per rank, else gloo. Results travel back
    pickled, so return tensors (moved to CPU) or plain values.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = _resolve_backend(backend, world_size)
    method = start_method or _default_start_method()
    if method == "fork":
        # Modules torch imports lazily on first use (DTensor, sympy) take seconds each; import
        # them once here so forked ranks inherit them instead of each paying again.
        import torch.distributed.tensor  # noqa: F401
    ctx: Any = mp.get_context(method)  # a concrete context (typed as the base, without Process)
    threads = _threads_per_rank(method, world_size)
    with tempfile.TemporaryDirectory(prefix="mcore-ranks-") as tmp:
        store = str(Path(tmp) / "store")
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, backend, store, timeout_s, threads, results, args, kwargs),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=10)


def _collect(procs: list, results: Any, world_size: int, timeout_s: float) -> list[Any]:
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            dead = [
                (r, p.exitcode)
                for r, p in enumerate(procs)
                if r not in out and p.exitcode not in (None, 0)
            ]
            if dead:
                rank, code = dead[0]
                raise RankError(f"rank {rank} of {world_size} died with exit code {code}") from None
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(out))
                raise RankError(
                    f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s"
                ) from None
            continue
        if not ok:
            raise RankError(f"rank {rank} of {world_size} raised:\n{value}")
        out[rank] = pickle.loads(value)
    return [out[r] for r in range(world_size)]


def pytest_in_child(config: Any, node: str, log: Path, **env: str) -> subprocess.Popen:
    """Start ``pytest node`` in a new process with this run's configuration (ini file, root
    directory) and ``env`` added to the environment; its output goes to the file ``log``.

    ``config`` is pytest's ``Config`` (``request.config`` or the ``pytestconfig`` fixture).
    Start it early and check it late to overlap it with other tests."""
    inifile = ["-c", str(config.inipath)] if config.inipath else []
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "--rootdir", str(config.rootpath), *inifile, node,
    ]  # fmt: skip
    with Path(log).open("w") as out:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def check_pytest_child(child: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    """Wait for a :func:`pytest_in_child` run; fail with its output unless every test it
    collected passed (a skip counts as a failure: the child exists to run them)."""
    try:
        returncode = child.wait(timeout=timeout_s)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    report = Path(log).read_text()[-8000:]
    if returncode != 0:
        raise AssertionError(f"the child pytest run failed:\n{report}")
    if " passed" not in report or "skipped" in report:
        raise AssertionError(f"the child pytest run passed nothing or skipped:\n{report}")


@contextlib.contextmanager
def served(command: list[str], *, shutdown_timeout_s: float = 60) -> Iterator[str]:
    """Run ``command`` (a server that prints ``"<name>: <url> ..."`` on its first line, as
    ``mcore serve`` does) and yield the URL. On leaving, the server gets SIGINT and must exit
    cleanly; on an error it is killed. Fails with the server's stderr if it never prints."""
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stderr is not None  # both are pipes
    try:
        line = server.stdout.readline()
        if not line.startswith("mcore serve: http://"):
            raise AssertionError(f"the server did not start: {line!r}\n{server.stderr.read()}")
        yield line.split()[2]
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=shutdown_timeout_s)
        if code != 0:
            raise AssertionError(f"the server exited with {code}:\n{server.stderr.read()}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def randomise_weights(module: Any, std: float, skip: tuple[str, ...] = ()) -> None:
    """Random weights ``N(0, std)``, and noise on every 1-D tensor (norms and biases start
    constant), so a tensor in the wrong place shows in a comparison. Names starting with one
    of ``skip`` and rotary ``inv_freq`` buffers are left alone."""
    import torch

    with torch.no_grad():
        for name, p in [*module.named_parameters(), *module.named_buffers()]:
            if name.startswith(skip) or "inv_freq" in name:
                continue
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0.0, std)
