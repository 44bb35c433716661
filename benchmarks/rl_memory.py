"""Per-rank memory of ``mcore rl``'s trainer and engine: whole-model engines with gathered
refit against engines in the training layout (TP2, PP2) with each rank's own shards copied.

For each training layout (``--parallel``: TP2, PP2), two runs train the same Llama-style model
on 2 gloo ranks (CPU, fp32) for ``--steps`` GRPO steps (``train_rl``, as ``mcore rl`` runs it),
one with ``rl.engine_layout = "whole"`` (every rank's engine is the whole model, refit
assembles every tensor on every rank: the layout before engines ran in the training layout)
and one with ``"training"`` (one engine over both ranks, each holding its TP shards or its
pipeline stage's layers). Then, per rank:

- **trainer**: bytes of the distinct tensor storages reachable from the model chunks and the
  optimizer (parameters, gradient buffers, fp32 main weights, Adam moments).
- **engine params**: bytes of the engine model's parameters and buffers.
- **engine KV cache**: the engine's KV cache while resumed (``stats().kv_cache_bytes``); the
  engine is sized for its share of a step's rollouts, so an engine over both ranks serves
  twice the requests of a whole-model one, each rank holding half the heads (TP2) or half the
  layers (PP2).
- **refit extra (peak)**: the most bytes of tensors that a refit allocated and still held at
  one time, measured by a ``TorchDispatchMode`` around ``refit_engine`` that counts every new
  storage an op returns (views and in-place results share their input's) until it is freed.
  Refit buckets are the loop's default (256 MB), so the whole-model refit of a model smaller
  than a bucket holds all of it at once.
- **reference fill extra (peak)**: the same for filling the frozen KL reference: the old fill
  (``gather_full_state_dict``, every global tensor on every rank) against the copy of each
  rank's shards (``reference_chunks`` today). Neither counts the reference model itself.

    uv run python benchmarks/rl_memory.py                # ~30M parameters, ~1 minute a layout
    uv run python benchmarks/rl_memory.py --parallel pp2 --hidden 256 --layers 2 --vocab 4096
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mcore.core.testing import run_ranks

MIB = 2**20
LAYOUTS = ("whole", "training")
PARALLEL = {"tp2": {"parallel.tp": "2"}, "pp2": {"parallel.pp": "2"}}
"""The training layouts measured, on 2 ranks each."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=16384, help="padded; the char tokenizer "
                        "uses the first ids only")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1, help="GRPO steps before measuring")
    parser.add_argument("--parallel", nargs="+", choices=sorted(PARALLEL),
                        default=list(PARALLEL), help="training layouts to measure")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write every rank's figures here")
    return parser.parse_args()


def overrides(args: argparse.Namespace, parallel: str, layout: str) -> dict[str, str]:
    """A small Llama (RMSNorm, SwiGLU, rope, untied embeddings) in ``parallel``, fp32 on CPU."""
    return {
        "train.device": "cpu",
        **PARALLEL[parallel],
        "model.num-layers": str(args.layers),
        "model.hidden-size": str(args.hidden),
        "model.num-attention-heads": str(args.heads),
        "model.ffn-hidden-size": str(args.ffn),
        "model.vocab-size": str(args.vocab),
        "model.max-position-embeddings": "128",
        "model.normalization": "RMSNorm",
        "model.activation": "swiglu",
        "model.position-embedding-type": "rope",
        "model.untie-embeddings-and-output-weights": "true",
        "data.tokenizer": "char",
        "train.seq-length": "32",
        "train.micro-batch-size": "4",
        "train.seed": "3",
        "train.train-iters": str(args.steps),
        "optimizer.lr-decay-style": "constant",
        "logger.progress-bar": "false",
        "logger.log-interval": "1000",
        "rl.char-alphabet": "abcd=",
        "rl.env-alphabet": "abcd",
        "rl.prompts-per-step": "4",
        "rl.group-size": "4",
        "rl.max-new-tokens": "6",
        "rl.engine-layout": layout,
    }


# --- measuring ---------------------------------------------------------------------------------


class AllocationPeak(TorchDispatchMode):
    """The peak bytes of tensor storage allocated inside the mode and alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0]}
        for tensor in tree_flatten(out)[0]:
            key = _storage_key(tensor)
            if key is None or key in inputs or key in self._live:
                continue  # a view or an in-place result: no new memory
            storage = tensor.untyped_storage()
            self._live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key, 0)


def _storage_key(tensor: Any) -> int | None:
    if not isinstance(tensor, torch.Tensor):
        return None
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (DTensor) holds none
        return None


def storage_bytes(*roots: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``roots`` (through modules,
    containers, and the attributes of mcore / megatron / torch.optim objects)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            try:
                storage = local.untyped_storage()
            except (RuntimeError, NotImplementedError):  # no storage of its own (opaque)
                continue
            storages[storage.data_ptr()] = storage.nbytes()
            stack += [getattr(obj, "grad", None), getattr(obj, "main_grad", None)]
        elif isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif isinstance(obj, nn.Module) or type(obj).__module__.startswith(
            ("mcore", "megatron", "torch.optim")
        ):
            stack += list(getattr(obj, "__dict__", {}).values())
    return sum(storages.values())


def _rank(
    rank: int, world: int, args: argparse.Namespace, parallel: str, layout: str
) -> dict[str, Any]:
    from mcore.core import get_plugin_manager, load_config
    from megatron_rl.inference import engine_layout, reference_chunks
    from megatron_rl.loop import train_rl
    from megatron_rl.refit import copy_local_weights, gather_full_state_dict, refit_engine

    config = load_config(overrides=overrides(args, parallel, layout))
    began = time.perf_counter()
    result = train_rl(config)
    seconds = time.perf_counter() - began
    engine, chunks = result.engine, result.chunks
    runtime = result.trainer.runtime
    sharded = engine_layout(runtime, layout).sharded
    out: dict[str, Any] = {"rank": rank, "layout": layout, "sharded": sharded, "run_s": seconds}
    out["trainer"] = storage_bytes(chunks, result.trainer.optimizer)
    out["engine_params"] = storage_bytes([*engine.model.parameters(), *engine.model.buffers()])
    engine.resume()
    out["engine_kv"] = engine.stats().kv_cache_bytes
    engine.suspend()
    with AllocationPeak() as peak:
        began = time.perf_counter()
        refit_engine(engine, chunks, sharded=sharded)
        out["refit_s"] = time.perf_counter() - began
    out["refit_extra"] = peak.peak
    # The reference's fill: every global tensor on every rank (before), or each rank's shards.
    registries = get_plugin_manager().registries
    (reference,) = reference_chunks(config, config.model, registries, runtime, chunks)
    with AllocationPeak() as peak:
        if sharded:
            copy_local_weights(reference, chunks[0])
        else:
            full = gather_full_state_dict(chunks)
            del full
    out["reference_extra"] = peak.peak
    return out


# --- report ------------------------------------------------------------------------------------

ROWS = (
    ("trainer", "trainer params+grads+optimizer"),
    ("engine_params", "engine params"),
    ("engine_kv", "engine KV cache"),
    ("total", "trainer + engine"),
    ("refit_extra", "refit extra (peak)"),
    ("peak", "trainer + engine + refit extra"),
    ("reference_extra", "reference fill extra (peak)"),
)


def report(parallel: str, results: dict[str, list[dict[str, Any]]]) -> None:
    for by_rank in results.values():
        for r in by_rank:
            r["total"] = r["trainer"] + r["engine_params"] + r["engine_kv"]
            r["peak"] = r["total"] + r["refit_extra"]
    old, new = results["whole"], results["training"]
    shards = f"{parallel.upper()} shards"
    print(f"{'per rank, MiB':32} {'rank':>4} {'whole + gather':>15} {shards:>12} {'ratio':>7}")
    for key, label in ROWS:
        for a, b in zip(old, new, strict=True):
            ratio = f"{b[key] / a[key]:.3f}" if a[key] else "-"
            print(
                f"{label:32} {a['rank']:>4} {a[key] / MIB:>15.2f} {b[key] / MIB:>12.2f} {ratio:>7}"
            )
    for a, b in zip(old, new, strict=True):
        print(
            f"rank {a['rank']}: run {a['run_s']:.1f} s / {b['run_s']:.1f} s, refit "
            f"{a['refit_s'] * 1e3:.1f} ms / {b['refit_s'] * 1e3:.1f} ms"
        )


def main() -> None:
    args = parse_args()
    n = (
        args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.ffn)
        + 2 * args.vocab * args.hidden
    )
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for parallel in args.parallel:
        results[parallel] = by_layout = {}
        for layout in LAYOUTS:
            by_layout[layout] = run_ranks(
                _rank, 2, args, parallel, layout, backend="gloo", timeout_s=600
            )
            assert by_layout[layout][0]["sharded"] == (layout == "training"), by_layout[layout]
        print(
            f"\nmodel: ~{n / 1e6:.1f}M parameters (fp32), {parallel.upper()} on 2 gloo ranks, "
            f"{args.steps} step(s)"
        )
        report(parallel, by_layout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
