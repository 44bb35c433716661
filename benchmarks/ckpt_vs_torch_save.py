"""Checkpoint save and load throughput: mcore-ckpt's ``torch_dist`` against ``torch.save``.

The state is a real training state: a GPT built by ``mcore train``'s runtime with its AdamW
optimizer after one step (fp32 weights, two moments, step counters), on N gloo ranks with
data parallelism (``--layout dp``) or the distributed optimizer (``--layout distopt``).
In one run, each rank

1. saves through mcore's checkpointer (sharded global tensors, CRC-32 of every file, atomic
   publish) and loads it back in place, resharding-capable;
2. ``torch.save``s the same tensors (its model and optimizer ``state_dict``) into one file
   per rank and ``torch.load``s them back (``weights_only``), the plain baseline.

Each measurement is repeated and the best kept; the page cache is dropped between writing
and reading where the OS allows (root), else reads may come from memory for both alike.
Throughput is the bytes of the job's state (one copy of weights and optimizer state: what
mcore's deduplicated files hold; with torch.save every data-parallel rank writes its own copy)
over the wall time of the slowest rank.

    uv run python benchmarks/ckpt_vs_torch_save.py                        # ~300 MB, 2 ranks
    uv run python benchmarks/ckpt_vs_torch_save.py --hidden 1024 --layers 8 --layout distopt
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mcore.core import get_plugin_manager, load_config
from mcore.core.testing import run_ranks


def _drop_caches() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: reads may hit the page cache (for both formats alike)


def _bench(rank: int, world: int, args: argparse.Namespace, tmp: str) -> dict[str, float]:
    overrides = {
        "model.num-layers": str(args.layers),
        "model.hidden-size": str(args.hidden),
        "model.num-attention-heads": str(max(1, args.hidden // 64)),
        "model.vocab-size": "32768",
        "train.seq-length": "64",
        "train.micro-batch-size": "1",
        "train.device": "cpu",
        "checkpoint.save": f"{tmp}/mcore",
        "checkpoint.verify-checksums": str(not args.no_verify).lower(),
    }
    if args.layout == "distopt":
        overrides["optimizer.use-distributed-optimizer"] = "true"
    config = load_config(overrides=overrides)
    manager = get_plugin_manager()
    runtime = manager.hook.mcore_training_runtime(config=config)
    chunks, optimizer, scheduler = runtime.build(config, config.model, manager.registries)
    # One real step so that the optimizer state exists.
    for p in chunks[0].parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    checkpointer = manager.hook.mcore_checkpointer(config=config, runtime=runtime)

    own = {
        "model": chunks[0].state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    out: dict[str, list[float]] = {
        k: [] for k in ("mcore_save", "mcore_load", "ts_save", "ts_load")
    }

    def timed(name: str, fn) -> None:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        out[name].append(float(elapsed))

    for it in range(args.repeats):
        timed("mcore_save", lambda it=it: checkpointer.save(it + 1, chunks, optimizer, scheduler,
                                                           {"iteration": it + 1}))  # fmt: skip
        if rank == 0:
            _drop_caches()
        timed("mcore_load", lambda: checkpointer.load(chunks, optimizer, scheduler))
        path = f"{tmp}/torch_save_rank{rank}.pt"
        timed("ts_save", lambda path=path: _torch_save(own, path))
        if rank == 0:
            _drop_caches()
        timed("ts_load", lambda path=path: torch.load(path, weights_only=True))
    # Every rank wrote its own copy with torch.save: count the bytes it put on disk.
    ts_bytes = torch.tensor([float(os.path.getsize(f"{tmp}/torch_save_rank{rank}.pt"))])
    dist.all_reduce(ts_bytes)
    checkpointer.finalize()
    # The job's state, once: what mcore's (deduplicated) checkpoint files hold.
    from mcore.ckpt import read_common, resolve

    common = read_common(resolve(f"{tmp}/mcore"))
    result = {k: min(v) for k, v in out.items()}
    result["mcore_bytes"] = float(sum(f["size"] for f in common["files"].values()))
    result["ts_bytes"] = float(ts_bytes)
    result["median_mcore_save"] = statistics.median(out["mcore_save"])
    return result


def _torch_save(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # mcore's save is durable (fsync); so is the baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layout", choices=["dp", "distopt"], default="dp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-verify", action="store_true", help="load without checking shard CRC-32s"
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR"))
    try:
        r = run_ranks(_bench, args.nproc, args, tmp, timeout_s=3600)[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = 1e9
    print(f"{args.nproc} gloo ranks, layout {args.layout}; state {r['mcore_bytes'] / gb:.3f} GB "
          f"(torch.save writes {r['ts_bytes'] / gb:.3f} GB over all ranks)")  # fmt: skip
    rows = {
        "mcore torch_dist": (r["mcore_save"], r["mcore_load"], r["mcore_bytes"]),
        "torch.save": (r["ts_save"], r["ts_load"], r["mcore_bytes"]),
    }
    print(f"{'':>18} {'save s':>8} {'save GB/s':>10} {'load s':>8} {'load GB/s':>10}")
    for name, (save, load, size) in rows.items():
        print(
            f"{name:>18} {save:8.3f} {size / gb / save:10.3f} {load:8.3f} {size / gb / load:10.3f}"
        )
    print(f"ratio mcore / torch.save (throughput): save {r['ts_save'] / r['mcore_save']:.3f}, "
          f"load {r['ts_load'] / r['mcore_load']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
