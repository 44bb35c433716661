"""Forward+backward time of mcore's ``MoELayer`` against transformers' ``MixtralSparseMoeBlock``.

One Mixtral-style MoE block (softmax router, top-k renormalised, SwiGLU experts), built four ways
from the same weights: ours with the grouped GEMM and with the per-expert loop
(``moe.grouped_gemm = false``), and transformers' with its ``grouped_mm`` experts (what a
transformers model picks by default) and its ``eager`` per-expert loop. Before timing, all four
must agree on the output and on every gradient. Then they run the same tokens in the same
process, alternating, so machine noise hits all alike. Prints the median ms/iter of each and
the ratios ours / theirs (above 1 means mcore is slower).

    uv run python benchmarks/moe_vs_transformers.py                 # CPU, fp32
    uv run python benchmarks/moe_vs_transformers.py --quick         # tiny sizes, a smoke run
    uv run python benchmarks/moe_vs_transformers.py --device cuda   # bf16
    uv run python benchmarks/moe_vs_transformers.py --profile 15    # + top ops of each
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mcore.models import ModelContext, TransformerConfig
from mcore.moe import MoEConfig
from mcore.moe.layer import MoELayer
from mcore.parallel import ParallelState

QUICK = {"hidden": 64, "ffn": 128, "experts": 4, "seq": 32, "batch": 2, "steps": 2}


def build_ours(args: argparse.Namespace, *, grouped_gemm: bool, dtype: torch.dtype) -> MoELayer:
    """Our MoE layer configured as Mixtral's block (softmax over the chosen top-k logits)."""
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=8,
        ffn_hidden_size=args.ffn,
        vocab_size=128,
        activation="swiglu",
    )
    moe = MoEConfig(
        num_experts=args.experts,
        router_topk=args.topk,
        router_score_function="softmax",
        grouped_gemm=grouped_gemm,
        # transformers computes the router logits in the model's dtype; do the same in bf16 so
        # both pick the same experts and the outputs can be compared.
        router_dtype="fp32" if dtype == torch.float32 else "native",
    )
    ctx = ModelContext(config, ParallelState(), sections={"moe": moe})
    torch.manual_seed(0)
    return MoELayer(ctx, layer_number=0)


def build_theirs(args: argparse.Namespace, *, implementation: str) -> MixtralSparseMoeBlock:
    """transformers' Mixtral MoE block with the given experts implementation."""
    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_local_experts=args.experts,
        num_experts_per_tok=args.topk,
        router_jitter_noise=0.0,
        experts_implementation=implementation,
    )
    return MixtralSparseMoeBlock(config)


@torch.no_grad()
def copy_weights(ours: MoELayer, theirs: MixtralSparseMoeBlock) -> None:
    """Give ``theirs`` our weights; both stack experts as [E, 2F (gate; up), H] and [E, H, F]."""
    theirs.gate.weight.copy_(ours.router.weight)
    theirs.experts.gate_up_proj.copy_(ours.experts.linear_fc1.weight)
    theirs.experts.down_proj.copy_(ours.experts.linear_fc2.weight)


def ours_step(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Forward and backward of our layer on ``x`` ``[batch, seq, hidden]``; returns the output."""
    # Our layer takes [seq, batch, hidden]; transformers' block [batch, seq, hidden].
    out = layer(x.transpose(0, 1)).transpose(0, 1)
    out.backward(dy)
    return out


def theirs_step(block: MixtralSparseMoeBlock, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Forward and backward of transformers' block on ``x`` ``[batch, seq, hidden]``."""
    out = block(x)
    out.backward(dy)
    return out


def gradients(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input's and the weights' gradients under our names, then cleared for the next run."""
    if isinstance(module, MoELayer):
        named = {
            "router": module.router.weight,
            "fc1": module.experts.linear_fc1.weight,
            "fc2": module.experts.linear_fc2.weight,
        }
    else:
        named = {
            "router": module.gate.weight,
            "fc1": module.experts.gate_up_proj,
            "fc2": module.experts.down_proj,
        }
    grads = {"input": x.grad.clone()} | {k: p.grad.clone() for k, p in named.items()}
    x.grad = None
    module.zero_grad(set_to_none=True)
    return grads


def check_same_function(
    runs: dict[str, Callable[[], torch.Tensor]],
    modules: dict[str, torch.nn.Module],
    x: torch.Tensor,
    tol: float,
) -> None:
    """Run each contender once and assert outputs and gradients all match the first's."""
    reference_name = next(iter(runs))
    results = {}
    for name, run in runs.items():
        out = run().detach().float()
        results[name] = {"output": out} | {
            k: g.float() for k, g in gradients(modules[name], x).items()
        }
    expected = results[reference_name]
    for name, got in results.items():
        for what, tensor in got.items():
            # Scale-aware: compare against the tensor's own magnitude, not absolute error.
            scale = expected[what].abs().max().item()
            torch.testing.assert_close(
                tensor,
                expected[what],
                rtol=tol,
                atol=tol * scale,
                msg=lambda m, n=name, w=what: f"{n} vs {reference_name}, {w}: {m}",
            )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816, help="width of each expert's MLP")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per contender")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile one more step of each contender (torch.profiler) and print "
        "its N operators with the most self time",
    )
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = args.device

    ours = {
        "mcore grouped_gemm": build_ours(args, grouped_gemm=True, dtype=dtype),
        "mcore loop": build_ours(args, grouped_gemm=False, dtype=dtype),
    }
    theirs = {
        "transformers grouped_mm": build_theirs(args, implementation="grouped_mm"),
        "transformers eager": build_theirs(args, implementation="eager"),
    }
    reference = ours["mcore grouped_gemm"]
    for layer in ours.values():
        layer.load_state_dict(reference.state_dict())
    for block in theirs.values():
        copy_weights(reference, block)
    modules: dict[str, torch.nn.Module] = {**ours, **theirs}
    for module in modules.values():
        module.to(device, dtype).train()

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.hidden)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        **{name: functools.partial(ours_step, layer, x, dy) for name, layer in ours.items()},
        **{name: functools.partial(theirs_step, block, x, dy) for name, block in theirs.items()},
    }

    # Doubles as the warm-up (allocator, kernels): every contender runs once here.
    check_same_function(runs, modules, x, tol=1e-4 if dtype == torch.float32 else 3e-2)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
            x.grad = None
            modules[name].zero_grad(set_to_none=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(
        f"device: {where}, torch {torch.__version__}, dtype {dtype_name}; hidden {args.hidden}, "
        f"{args.experts} experts of ffn {args.ffn}, top-{args.topk}, {args.batch}x{args.seq} "
        f"tokens; forward+backward, median of {args.steps}; outputs and gradients match"
    )
    for name, t in med.items():
        print(f"{name:>24}: {t * 1e3:9.1f} ms/iter  {tokens / t:9.0f} tokens/s")
    print("ratio mcore / transformers (above 1: mcore is slower)")
    print(f"{'':>24}  {'grouped_mm':>10}  {'eager':>10}")
    for name in ours:
        row = [med[name] / med[f"transformers {impl}"] for impl in ("grouped_mm", "eager")]
        print(f"{name:>24}  {row[0]:10.3f}  {row[1]:10.3f}")
    if args.profile:
        for name, run in runs.items():
            profile_step(name, run, device, args.profile)
            x.grad = None
            modules[name].zero_grad(set_to_none=True)


def profile_step(name: str, run: Callable[[], torch.Tensor], device: str, rows: int) -> None:
    """One step of ``run`` under torch.profiler: its ``rows`` operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n{name}: one step, top {rows} operators by self time")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=36))


if __name__ == "__main__":
    main()
