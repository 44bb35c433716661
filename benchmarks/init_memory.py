"""Peak memory and wall time per rank of building a ~1B-parameter Llama: one process against
4 gloo ranks (TP2 x PP2, and megatron-fsdp over 4).

Every rank builds the model exactly as ``mcore train`` does: ``load_config``, then
``init_distributed``, then the ``mcore_training_runtime`` hook's runtime ``.build(config,
model_config, registries)``, which makes the model, wraps it for data parallelism (``ddp``, or
``train.data_parallel = "megatron_fsdp"``) and builds its optimizer. Whatever the code of the
day does to initialise a model is what gets measured; the script needs no change when that does.

Each scenario runs on its own (one at a time, so peaks do not overlap), every rank a fresh
process with torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK).

What a rank reports (fp32 on CPU; memory from ``/proc/self/status``):

- **peak RSS**: the process's peak resident set during the build. The kernel's high-water mark
  (VmHWM) is reset to the current RSS just before the build (``echo 5 > /proc/self/clear_refs``)
  and read right after it, so it is the true peak of the build including what the process
  already held (Python, torch, gloo: the *baseline*). Were the reset refused, the mark would
  count the imports' own peak too, and the report says so. What the build would import on
  first use (the model, wrapper and optimizer modules, ``torch._dynamo``) is imported before
  it: that costs the same whatever the model.
- **build**: peak RSS minus the RSS just before the build: the memory the build itself needed.
  The target is judged on this one, since the baseline does not scale with the model; the
  ratio of the absolute peaks is printed beside it.
- **to DP wrap**: the same two figures and the time when the build calls the data-parallel
  wrapper, i.e. the model alone.
- **params**: bytes of the parameters this rank holds (its local shards).

Ratios are a rank's figure / the single process's, the worst rank of each scenario. The target
is a per-rank peak at most 0.3 of the single process's (ideal 0.25: a quarter of the model each).

    uv run python benchmarks/init_memory.py                                  # ~1B, ~20 GiB free
    uv run python benchmarks/init_memory.py --hidden 256 --layers 4          # a smoke run
    uv run python benchmarks/init_memory.py --scenarios single,fsdp4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 2**30
# name -> (ranks, config overrides beyond the model's)
SCENARIOS: dict[str, tuple[int, dict[str, str]]] = {
    "single": (1, {}),
    "tp2pp2": (
        4,
        {"parallel.tensor-model-parallel-size": "2", "parallel.pipeline-model-parallel-size": "2"},
    ),
    "fsdp4": (4, {"train.data-parallel": "megatron_fsdp"}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=18, help="even, for PP2")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-groups", type=int, default=8, help="GQA query groups")
    parser.add_argument("--ffn", type=int, default=None, help="default: 2.75 x hidden")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated of {list(SCENARIOS)}"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per rank (default: cores/ranks)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scenario")
    parser.add_argument("--json", default=None, help="also write every rank's figures here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ffn is None:
        args.ffn = int(2.75 * args.hidden)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    return args


def model_overrides(args: argparse.Namespace) -> dict[str, str]:
    """A Llama: RMSNorm, SwiGLU, rope, GQA, no biases, untied embeddings; fp32 on CPU."""
    return {
        "train.device": "cpu",
        "model.num-layers": str(args.layers),
        "model.hidden-size": str(args.hidden),
        "model.num-attention-heads": str(args.heads),
        "model.num-query-groups": str(args.kv_groups),
        "model.ffn-hidden-size": str(args.ffn),
        "model.vocab-size": str(args.vocab),
        "model.normalization": "RMSNorm",
        "model.activation": "swiglu",
        "model.position-embedding-type": "rope",
        "model.untie-embeddings-and-output-weights": "true",
    }


def llama_parameters(args: argparse.Namespace) -> int:
    """The parameter count of the model ``model_overrides`` describes."""
    h, f, v = args.hidden, args.ffn, args.vocab
    kv = 2 * args.kv_groups * (h // args.heads)
    layer = 2 * h + h * (h + kv) + h * h + h * 2 * f + f * h  # 2 norms, qkv, proj, fc1, fc2
    return args.layers * layer + 2 * v * h + h  # embedding, output layer, final norm


# --- one rank ----------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    kib = {k: re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1) for k in ("VmRSS", "VmHWM")}
    return {k: int(v) * 1024 for k, v in kib.items()}


def _reset_peak() -> bool:
    """Set the high-water mark to the current RSS (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _MarkedRegistries:
    """The run's registries, noting time and memory when the build first calls the
    data-parallel wrapper (the model alone is built) and the optimizer (it is wrapped)."""

    MARKED = ("data_parallel", "optimizer")

    def __init__(self, registries: Any, start: float, marks: dict[str, dict[str, float]]) -> None:
        self._registries, self._start, self._marks = registries, start, marks

    def __getitem__(self, kind: str) -> Any:
        registry = self._registries[kind]
        return _MarkedRegistry(registry, kind, self._mark) if kind in self.MARKED else registry

    def get(self, kind: str, name: str) -> Any:
        return self[kind].get(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registries, name)

    def _mark(self, kind: str) -> None:
        if kind not in self._marks:
            self._marks[kind] = {"seconds": time.perf_counter() - self._start, **_status()}


class _MarkedRegistry:
    """One registry whose entries call ``mark(kind)`` before they run."""

    def __init__(self, registry: Any, kind: str, mark: Any) -> None:
        self._registry, self._kind, self._mark = registry, kind, mark

    def get(self, name: str) -> Any:
        entry = self._registry.get(name)

        @functools.wraps(entry)  # keeps the entry's attributes (accepts_meta_model)
        def marked(*args: Any, **kwargs: Any) -> Any:
            self._mark(self._kind)
            return entry(*args, **kwargs)

        return marked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)


def _held_parameter_bytes(chunks: list) -> tuple[int, int]:
    """(elements, bytes) of the parameters this rank holds: local shards of DTensors."""
    seen: set[int] = set()
    numel = nbytes = 0
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            local = p.to_local() if hasattr(p, "to_local") else p
            numel += local.numel()
            nbytes += local.numel() * local.element_size()
    return numel, nbytes


def _warm_imports(registries: Any, config: Any) -> None:
    """Import now what the build would import on first use (the registries' lazy entries, and
    ``torch._dynamo``, which a torch optimizer loads when first made): seconds and hundreds of
    MiB that do not depend on the model, and which a run pays once."""
    import torch._dynamo  # noqa: F401

    registries.get("model", config.model.name)
    registries.get("data_parallel", config.train.data_parallel)
    registries.get("optimizer", config.optimizer.optimizer)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mcore.core import load_config
    from mcore.core.plugins import get_plugin_manager
    from mcore.core.training.loop import init_distributed

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    _, extra = SCENARIOS[args.worker]
    manager = get_plugin_manager()
    config = load_config(overrides={**model_overrides(args), **extra}, manager=manager)
    init_distributed(config)  # what mcore train does, in this order
    runtime = manager.hook.mcore_training_runtime(config=config)
    _warm_imports(manager.registries, config)
    torch.manual_seed(config.train.seed)
    if dist.is_initialized():
        dist.barrier()  # every rank starts building at once

    before = _status()["VmRSS"]
    reset = _reset_peak()
    marks: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    registries = _MarkedRegistries(manager.registries, start, marks)
    chunks, _optimizer, _scheduler = runtime.build(config, config.model, registries)
    seconds = time.perf_counter() - start
    after = _status()
    numel, nbytes = _held_parameter_bytes(chunks)
    model = marks.get("data_parallel", {})
    result = {
        "rank": int(os.environ.get("RANK", "0")),
        "threads": torch.get_num_threads(),
        "hwm_reset": reset,
        "rss_before": before,
        "peak": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "seconds": seconds,
        "model_peak": model.get("VmHWM"),
        "model_seconds": model.get("seconds"),
        "param_numel": numel,
        "param_bytes": nbytes,
    }
    if dist.is_initialized():
        dist.barrier()
    Path(args.out).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the launcher ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenario(name: str, argv: list[str], timeout: float) -> list[dict[str, Any]]:
    """Launch the scenario's ranks as fresh processes; their figures, in rank order."""
    world, _ = SCENARIOS[name]
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
            }
            out = os.path.join(tmp, f"rank{rank}.json")
            cmd = [sys.executable, __file__, *argv, "--worker", name, "--out", out]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        failed = [r for r, p in enumerate(procs) if p.returncode]
        if failed:
            codes = [procs[r].returncode for r in failed]
            raise SystemExit(f"{name}: rank(s) {failed} exited with {codes} (-9: out of memory?)")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _build(r: dict[str, Any]) -> int:
    return r["peak"] - r["rss_before"]


def _model(r: dict[str, Any]) -> int | None:
    return None if r["model_peak"] is None else r["model_peak"] - r["rss_before"]


def print_setup(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    import torch

    count = llama_parameters(args)
    meminfo = Path("/proc/meminfo").read_text()
    mem_total = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) * 1024
    print(
        f"\nmodel: Llama-like, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"{args.kv_groups} kv groups, ffn {args.ffn}, vocab {args.vocab}, untied; "
        f"{count:,} parameters ({count / 1e9:.3f} B), {_gib(count * 4)} GiB fp32"
    )
    print(
        f"machine: {os.cpu_count()} cores, {_gib(mem_total)} GiB RAM, torch {torch.__version__}, "
        "gloo; build = runtime.build (model, DP wrapper, optimizer)"
    )
    if "single" in results and results["single"][0]["param_numel"] != count:
        print(f"note: the single process holds {results['single'][0]['param_numel']:,} parameters")
    if not all(r["hwm_reset"] for ranks in results.values() for r in ranks):
        print("note: /proc/self/clear_refs refused; peaks include each process's import peak")


def print_ranks(results: dict[str, list[dict[str, Any]]]) -> None:
    print(
        "\nGiB and seconds; build = peak RSS - RSS before the build; "
        "to DP wrap = the same, and the time, once the model alone is built"
    )
    columns = ("scenario", "rank", "thr", "peak RSS", "build", "to DP wrap", "time", "to wrap")
    widths = (8, 4, 3, 9, 7, 10, 7, 8, 7)
    print(" ".join(f"{c:>{w}}" for c, w in zip((*columns, "params"), widths, strict=True)))
    for name, ranks in results.items():
        for r in ranks:
            wrap_s = "-" if r["model_seconds"] is None else f"{r['model_seconds']:.1f}"
            cells = (
                name, r["rank"], r["threads"], _gib(r["peak"]), _gib(_build(r)),
                _gib(_model(r)), f"{r['seconds']:.1f}", wrap_s, _gib(r["param_bytes"]),
            )  # fmt: skip
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


def print_ratios(results: dict[str, list[dict[str, Any]]]) -> None:
    """The worst rank of each scenario against the single process."""
    if "single" not in results:
        return
    (single,) = results["single"]
    print(
        "\nworst rank / single process; target: a rank's build peak <= 0.30 of the single "
        "process's (ideal 0.25)"
    )
    for name, ranks in results.items():
        if name == "single":
            continue
        build = max(_build(r) for r in ranks) / _build(single)
        verdict = "meets" if build <= 0.3 else "misses"
        figures = {
            "peak RSS": max(r["peak"] for r in ranks) / single["peak"],
            "params held": max(r["param_bytes"] for r in ranks) / single["param_bytes"],
            "time": max(r["seconds"] for r in ranks) / single["seconds"],
        }
        if _model(single) and all(_model(r) is not None for r in ranks):
            figures["to DP wrap"] = max(_model(r) for r in ranks) / _model(single)
        rest = ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
        print(f"{name:>8}: build {build:.3f} ({verdict} the target); {rest}")


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    results = {}
    for name in args.scenarios:
        print(f"--- {name}: {SCENARIOS[name][0]} rank(s)", flush=True)
        results[name] = run_scenario(name, argv, args.timeout)
    print_setup(args, results)
    print_ranks(results)
    print_ratios(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
