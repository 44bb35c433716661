"""Speculative decoding with MTP depths against the same engine without it.

A GPT with ``--mtp`` multi-token-prediction depths is trained with ``mcore train`` on the
built-in corpus (the running Python's standard-library source; no downloads), saved, and
loaded by ``mcore.inference.load_model``, as ``mcore serve`` would. Then the same pool of
``--requests`` prompts (cut from standard-library sources, greedy, ``--new-tokens`` each,
end-of-sequence ignored) runs in waves of 1, 4 and 32 concurrent requests, through the same
``DynamicInferenceEngine`` with ``num_speculative_tokens`` 0 and ``--spec``, alternating,
``--repeat`` times each.

Reported per concurrency: decode tokens/s of each (the tokens after every request's first,
over the time after the wave's prefill; the prefill is the same work both ways), their ratio,
the acceptance rate of each draft position and the mean tokens a verifying step produces; and
whether the outputs agree token for token (greedy: they must).

    uv run python benchmarks/speculative_decoding.py                 # train, then measure
    uv run python benchmarks/speculative_decoding.py --model DIR     # a checkpoint with MTP
    uv run python benchmarks/speculative_decoding.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mcore.inference import DynamicInferenceEngine, InferenceConfig, SamplingParams, load_model


def train_checkpoint(args: argparse.Namespace, folder: str) -> str:
    """``mcore train`` (one process) with MTP depths; returns the checkpoint directory."""
    from mcore.core import load_config
    from mcore.core.training.loop import train

    save = str(Path(folder) / "mtp-run")
    overrides = {
        "model.num-layers": str(args.layers),
        "model.hidden-size": str(args.hidden),
        "model.num-attention-heads": str(args.hidden // 64),
        "model.mtp-num-layers": str(args.mtp),
        "model.mtp-loss-scaling-factor": str(args.mtp_factor),
        "train.train-iters": str(args.train_iters),
        "train.seq-length": "256",
        "train.micro-batch-size": "8",
        "optimizer.lr": "1e-3",
        "checkpoint.save": save,
        "logger.log-interval": str(max(1, args.train_iters // 5)),
    }
    os.environ.setdefault("WORLD_SIZE", "1")
    start = time.perf_counter()
    result = train(load_config(overrides=overrides))
    print(
        f"trained {args.layers} layers x {args.hidden}, {args.mtp} MTP depth(s), "
        f"{args.train_iters} steps in {time.perf_counter() - start:.0f} s: "
        f"loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}",
        flush=True,
    )
    return save


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` token prompts of ``length`` from standard-library sources (the kind of text
    the model trained on), spread over the text."""
    import inspect
    import json
    import textwrap

    text = "\n".join(inspect.getsource(m) for m in (json, textwrap, argparse))
    ids = tokenizer.encode(text)
    step = max(1, (len(ids) - length) // count)
    return [ids[i * step : i * step + length] for i in range(count)]


def run(model, tokenizer, spec: int, pool: list[list[int]], concurrency: int, args) -> dict:
    """The prompts of ``pool`` in waves of ``concurrency`` requests added at once: decode
    tokens/s (the tokens after each request's first, over the time from the step that gave
    every request of the wave its first token to the wave's end), and the engine's stats."""
    engine = DynamicInferenceEngine(
        model,
        InferenceConfig(
            device="cpu",
            max_requests=max(concurrency, 1),
            max_tokens=4096,
            max_sequence_length=1024,
            block_size_tokens=64,
            buffer_size_gb=1.0,
            num_speculative_tokens=spec,
        ),
        tokenizer=tokenizer,
    )
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    outputs: dict = {}
    ids: list = []
    decode_tokens, decode_seconds = 0, 0.0
    for first in range(0, len(pool), concurrency):
        wave = [engine.add_request(p, params) for p in pool[first : first + concurrency]]
        ids += wave
        started = None
        while engine.has_unfinished_requests():
            for delta in engine.step():
                outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
            if started is None and all(outputs.get(i) for i in wave):
                started = time.perf_counter()
                before = sum(len(outputs[i]) for i in wave)
        decode_seconds += time.perf_counter() - started
        decode_tokens += sum(len(outputs[i]) for i in wave) - before
    stats = engine.stats()
    return {
        "tps": decode_tokens / decode_seconds,
        "outputs": [outputs[i] for i in ids],
        "acceptance": [
            a / d if d else 0.0
            for a, d in zip(
                stats.spec_accepted_per_position or [],
                stats.spec_drafted_per_position or [],
                strict=True,
            )
        ],
        "tokens_per_verify": stats.spec_tokens_per_verify_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint with MTP depths (default: train one)")
    parser.add_argument("--save", help="keep the trained checkpoint in this directory")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mtp", type=int, default=2)
    parser.add_argument("--mtp-factor", type=float, default=0.3)
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--spec", type=int, default=2, help="num_speculative_tokens")
    parser.add_argument("--concurrency", default="1,4,32")
    parser.add_argument("--requests", type=int, default=32, help="prompts in the pool")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.train_iters, args.new_tokens, args.repeat = 4, 30, 24, 1
        args.concurrency, args.requests = "1,4", 8
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = args.model or train_checkpoint(args, args.save or folder)
        model, tokenizer = load_model(path)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    pool = prompts(tokenizer, args.requests, args.prompt_len)
    print(
        f"{len(pool)} requests of {args.prompt_len} prompt + {args.new_tokens} new tokens, "
        f"num_speculative_tokens {args.spec}"
    )
    print(
        f"{'requests':>9}  {'plain tok/s':>11}  {'spec tok/s':>10}  {'ratio':>5}  "
        f"{'accept per position':>20}  {'tok/verify':>10}  same"
    )
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        plain, spec = [], []
        for _ in range(args.repeat):
            plain.append(run(model, tokenizer, 0, pool, concurrency, args))
            spec.append(run(model, tokenizer, args.spec, pool, concurrency, args))
        p = statistics.median(r["tps"] for r in plain)
        s = statistics.median(r["tps"] for r in spec)
        same = all(a["outputs"] == b["outputs"] for a, b in zip(plain, spec, strict=True))
        accept = " ".join(f"{a:.2f}" for a in spec[-1]["acceptance"])
        print(
            f"{concurrency:>9}  {p:>11.1f}  {s:>10.1f}  {s / p:>5.2f}  {accept:>20}  "
            f"{spec[-1]['tokens_per_verify']:>10.2f}  {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
