"""Training throughput of ``mcore train``'s step against a plain ``transformers`` Llama loop.

Same architecture (GQA, SwiGLU, RMSNorm, rope, tied embeddings), same batch and sequence
length, AdamW in both, one process, one run, alternating nothing: mcore's loop runs first (its
data comes from the built-in corpus), then the transformers loop on random tokens of the same
shape. Prints the median tokens/s of each (first two steps dropped as warm-up) and the ratio.

    uv run python benchmarks/train_vs_transformers.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from mcore.core import load_config
from mcore.core.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mbs", type=int, default=8)
    args = parser.parse_args()
    ffn = 4 * args.hidden

    config = load_config(
        overrides={
            "train.train-iters": str(args.steps),
            "train.micro-batch-size": str(args.mbs),
            "train.seq-length": str(args.seq),
            "train.device": "cpu" if not torch.cuda.is_available() else "auto",
            "model.num-layers": str(args.layers),
            "model.hidden-size": str(args.hidden),
            "model.num-attention-heads": str(args.heads),
            "model.ffn-hidden-size": str(ffn),
            "logger.log-interval": str(10**6),
        }
    )
    result = train(config)
    ours = statistics.median(result.step_seconds[2:])
    vocab = 384  # what mcore built: the byte tokenizer's 263 ids padded to a multiple of 128

    hf_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    ids = torch.randint(0, vocab, (args.mbs, args.seq), device=device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    theirs = statistics.median(times[2:])

    tokens = args.mbs * args.seq
    print(f"{args.layers} layers, hidden {args.hidden}, {args.mbs}x{args.seq} tokens/step, "
          f"{device}, {torch.get_num_threads()} threads, {args.steps} steps")  # fmt: skip
    print(f"  transformers loop: {tokens / theirs:8.0f} tokens/s")
    print(f"  mcore train step:  {tokens / ours:8.0f} tokens/s")
    print(f"ratio mcore / transformers (tokens/s): {theirs / ours:.3f}")


if __name__ == "__main__":
    main()
