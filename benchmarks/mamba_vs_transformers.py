"""Forward+backward time of one Mamba-2 mixer: mcore's ``MambaMixer`` against transformers'
``NemotronHMamba2Mixer`` (its pure-torch path, what runs without the CUDA kernels), same weights.

Both are built at Nemotron-H-like proportions (heads of 64 channels, 8 groups, state 128,
chunk 128, conv 4), given the same weights, and checked to agree on the output and on the input
and weight gradients before timing. They then run the same tokens, alternating, and the script
prints the median ms/iter and the ratio mcore / transformers (above 1: mcore is slower).

    uv run python benchmarks/mamba_vs_transformers.py              # CPU, fp32
    uv run python benchmarks/mamba_vs_transformers.py --quick      # tiny sizes, a smoke run
    uv run python benchmarks/mamba_vs_transformers.py --device cuda --kernel triton
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from mcore.models import ModelContext, TransformerConfig
from mcore.parallel import ParallelState
from mcore.ssm.config import SSMConfig
from mcore.ssm.mamba import MambaMixer

QUICK = {"hidden": 64, "heads": 4, "head_dim": 16, "groups": 2, "state": 16, "seq": 64,
         "batch": 1, "chunk": 16, "steps": 2}  # fmt: skip


def build(args: argparse.Namespace) -> tuple[MambaMixer, NemotronHMamba2Mixer]:
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, vocab_size=128
    )
    ssm = SSMConfig(
        mamba_num_heads=args.heads, mamba_head_dim=args.head_dim, mamba_num_groups=args.groups,
        mamba_state_dim=args.state, mamba_chunk_size=args.chunk, ssm_kernel=args.kernel,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = MambaMixer(ModelContext(config, ParallelState(), sections={"ssm": ssm}), layer_number=0)
    hf_config = NemotronHConfig(
        hidden_size=args.hidden, mamba_num_heads=args.heads, mamba_head_dim=args.head_dim,
        n_groups=args.groups, ssm_state_size=args.state, chunk_size=args.chunk,
        layers_block_type=["linear_attention"], time_step_min=0.0, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    theirs = NemotronHMamba2Mixer(hf_config, layer_idx=0)
    with torch.no_grad():  # the same tensors under the same names
        for name, p in theirs.named_parameters():
            p.copy_(ours.get_parameter(name))
    return ours, theirs


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, sequence_first: bool):
    x = x.detach().requires_grad_()
    y = module(x.transpose(0, 1)).transpose(0, 1) if sequence_first else module(x)
    y.backward(grad)
    return y.detach(), x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kernel", choices=["torch", "triton"], default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    ours, theirs = build(args)
    ours, theirs = ours.to(args.device), theirs.to(args.device)
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device)
    grad = torch.randn_like(x)

    y_ours, gx_ours = step(ours, x, grad, sequence_first=True)
    y_theirs, gx_theirs = step(theirs, x, grad, sequence_first=False)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_ours, gx_theirs, atol=1e-4, rtol=1e-4)
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name).grad, p.grad, atol=1e-3, rtol=1e-3,
                                   msg=name)  # fmt: skip

    times: dict[str, list[float]] = {"mcore": [], "transformers": []}
    for _ in range(args.steps):
        for label, module, first in (("mcore", ours, True), ("transformers", theirs, False)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(module, x, grad, sequence_first=first)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[label].append((time.perf_counter() - start) * 1e3)
    ms = {label: statistics.median(t) for label, t in times.items()}
    print(f"Mamba-2 mixer fwd+bwd, {args.batch} x {args.seq} tokens, hidden {args.hidden}, "
          f"{args.heads} heads x {args.head_dim}, {args.groups} groups, state {args.state}, "
          f"chunk {args.chunk}, {args.device}, kernel {args.kernel}")  # fmt: skip
    print(f"  transformers {ms['transformers']:.1f} ms   mcore {ms['mcore']:.1f} ms   "
          f"mcore / transformers {ms['mcore'] / ms['transformers']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
