"""Forward+backward time of an mcore GPTModel against the equivalent ``transformers`` Llama.

Both models hold the same weights (the HF model is saved and loaded with ``load_hf``) and run
the same batch in the same process, alternating, so machine noise hits both alike. Prints the
median step time of each and the ratio mcore / transformers (below 1 means mcore is faster).

    uv run python benchmarks/gpt_vs_transformers.py                 # CPU, fp32
    uv run python benchmarks/gpt_vs_transformers.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from mcore.models.hf import load_hf


def step(model, ids, labels, is_hf: bool) -> None:
    loss = model(input_ids=ids, labels=labels).loss if is_hf else model(ids, labels=labels).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf(folder)
    hf = hf.to(args.device, dtype).train()
    ours = ours.to(args.device, dtype).train()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)

    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        step(hf, ids, labels, True)
        step(ours, ids, labels, False)
    times: dict[str, list[float]] = {"transformers": [], "mcore": []}
    for _ in range(args.steps):
        for name, model, is_hf in (("transformers", hf, True), ("mcore", ours, False)):
            sync(args.device)
            start = time.perf_counter()
            step(model, ids, labels, is_hf)
            sync(args.device)
            times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(f"device: {where}, dtype {args.dtype}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.batch}x{args.seq} tokens, {args.steps} steps")  # fmt: skip
    for name, t in med.items():
        print(f"{name:>12}: {t * 1e3:8.1f} ms/step  {tokens / t:10.0f} tokens/s")
    print(f"ratio mcore / transformers: {med['mcore'] / med['transformers']:.3f}")


if __name__ == "__main__":
    main()
