"""Training step of one model under ``megatron_fsdp.fully_shard`` and under PyTorch's FSDP2.

Both wrap the same plain-PyTorch decoder the same way (each block, then the root) with the same
initial weights, optimizer (AdamW, foreach) and batches. One run of this script:

1. **time**: N ranks hold both models at once and alternate steps, so machine noise hits both
   alike; prints the median step time (forward, backward, optimizer step) of each;
2. **memory**: N fresh ranks per framework (one framework per process, so peaks do not mix)
   measure the peak during training. On CUDA that is ``torch.cuda.max_memory_allocated`` minus
   what was allocated before the model was built. On CPU there is no allocator counter, so it is
   the process's *peak resident set* (``ru_maxrss``) minus its resident set before the model was
   built, with glibc told to return freed tensors to the OS at once (so RSS follows live
   tensors): an honest but coarser measure, which includes activations and temporaries. Both also
   report the model state counted from the tensors (local shards of parameters, gradients and
   optimizer state).

Ratios are megatron_fsdp / FSDP2 (below 1 means megatron_fsdp is faster or smaller).

    uv run python benchmarks/fsdp_vs_torch_fsdp2.py                        # 2 gloo ranks, CPU
    uv run python benchmarks/fsdp_vs_torch_fsdp2.py --device cuda --nproc 8 --dtype bf16
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import megatron_fsdp

# FSDP2's own strategy names for the same sharding: reshard after forward or not.
FSDP2_RESHARD = {"optim_grads_params": True, "optim_grads": False}


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden, bias=False)
        self.fc2 = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.blocks = nn.ModuleList(Block(args.hidden, args.heads) for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.hidden)
        self.head = nn.Linear(args.hidden, args.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(
    args: argparse.Namespace, framework: str, mesh
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Decoder(args).to(mesh.device_type)
    compute = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    if framework == "megatron_fsdp":
        policy = megatron_fsdp.MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for module in [*model.blocks, model]:
            megatron_fsdp.fully_shard(
                module, mesh=mesh, sharding_strategy=args.strategy, mp_policy=policy
            )
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        reshard = FSDP2_RESHARD[args.strategy]
        for module in [*model.blocks, model]:
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def batch(args: argparse.Namespace, step: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + dist.get_rank())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def train_step(model, optimizer, ids, targets) -> float:
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Local bytes of parameters, gradients and optimizer state, counted from the tensors."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for v in s.values()]
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if isinstance(t, DTensor) else t
            total += local.numel() * local.element_size()
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_both(args: argparse.Namespace, mesh) -> dict[str, float]:
    device = mesh.device_type
    models = {name: build(args, name, mesh) for name in ("FSDP2", "megatron_fsdp")}
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        ids, targets = batch(args, step, device)
        for name, (model, optimizer) in models.items():
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, ids, targets)
            sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(args: argparse.Namespace, mesh, framework: str) -> dict[str, int]:
    device = mesh.device_type
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        # M_MMAP_THRESHOLD: serve every allocation above 64 KiB by mmap, so a freed tensor
        # leaves the resident set at once instead of staying in glibc's heap.
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
        before = _rss_bytes()
    model, optimizer = build(args, framework, mesh)
    for step in range(args.warmup + 2):
        train_step(model, optimizer, *batch(args, step, device))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    # Once more without zero_grad so gradients are counted in the model state.
    ids, targets = batch(args, 0, device)
    F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten()).backward()
    return {"peak": peak, "state": model_state_bytes(model, optimizer)}


def _rank(rank: int, world: int, store: str, args, phase: str, framework: str, results) -> None:
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(minutes=10),
    )  # fmt: skip
    try:
        mesh = init_device_mesh(args.device, (world,))
        out = time_both(args, mesh) if phase == "time" else peak_memory(args, mesh, framework)
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, phase: str, framework: str = "") -> list:
    ctx = mp.get_context("spawn" if args.device == "cuda" else "fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank, args=(r, args.nproc, store, args, phase, framework, results))
            for r in range(args.nproc)
        ]
        for p in procs:
            p.start()
        out = dict(results.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a rank exited with code {p.exitcode}")
    return [out[r] for r in range(args.nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--strategy", default="optim_grads_params", choices=sorted(FSDP2_RESHARD),
        help="megatron_fsdp strategy; FSDP2 gets the matching reshard_after_forward",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    args = parser.parse_args()
    if args.device == "cpu":
        args.threads = max(1, min(args.threads, (os.cpu_count() or 1) // args.nproc))

    step = run(args, "time")[0]
    memory = {name: run(args, "memory", name) for name in ("FSDP2", "megatron_fsdp")}
    peak = {name: max(r["peak"] for r in ranks) for name, ranks in memory.items()}
    state = {name: max(r["state"] for r in ranks) for name, ranks in memory.items()}

    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {args.threads} thread(s) per rank"
    )
    peak_kind = "CUDA max allocated" if args.device == "cuda" else "peak RSS delta"
    print(f"device: {where}; {args.nproc} ranks ({'NCCL' if args.device == 'cuda' else 'gloo'}), "
          f"{args.dtype}, {args.strategy}; {args.layers} layers, hidden {args.hidden}, "
          f"{args.batch}x{args.seq} tokens per rank, median of {args.steps} steps")  # fmt: skip
    print(f"{'':>14} {'ms/step':>9} {peak_kind + ' MiB':>24} {'model state MiB':>16}")
    for name in ("FSDP2", "megatron_fsdp"):
        print(f"{name:>14} {step[name] * 1e3:9.1f} {peak[name] / 2**20:24.1f} "
              f"{state[name] / 2**20:16.1f}")  # fmt: skip
    print(f"ratio megatron_fsdp / FSDP2: step time {step['megatron_fsdp'] / step['FSDP2']:.3f}, "
          f"peak memory {peak['megatron_fsdp'] / peak['FSDP2']:.3f}, "
          f"model state {state['megatron_fsdp'] / state['FSDP2']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
