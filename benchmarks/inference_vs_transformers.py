"""Generation throughput and latency of mcore's inference engine against ``transformers``.

One random Llama (GQA, SwiGLU, RMSNorm, rope; no downloads) is saved once and loaded by both.
The workload is a batch of requests that all arrive at once, with mixed prompt lengths and a
fixed number of new tokens each (greedy, end-of-sequence ignored, so both generate exactly the
same number of tokens): mcore's ``DynamicInferenceEngine`` (continuous batching, chunked
prefill, paged KV cache; CUDA graphs on a GPU) against ``transformers`` batched ``generate``
(left padding, its dynamic KV cache) in batches of ``--hf-batch-size``, one after another.

Each side runs ``--repeat`` times, alternating, and the run of median wall time is reported.
Reported for each: output tokens/s over the whole workload, mean time to first token (TTFT,
from the workload's start, so queueing counts) and mean time per output token after the first
(TPOT). For transformers a request's first token is when its batch's first decoding step
runs, and its last when ``generate`` returns. Also printed: how many greedy generations agree
token for token.

Then mcore's decode step against its compute floor: the mean time of the engine steps that
only decode (of the reported run), and the matmul FLOPs of those steps (projections, MLP, LM
head and attention over each request's context, from the model's config) at the fp32 (bf16 on
CUDA) GEMM throughput measured here, on a ``[2048, hidden] x [hidden, 2 * ffn]`` matmul. What
is left between the two is overhead: small ops, gathers, the host's work per step.

``--tp 2`` also runs mcore's engine over 2 tensor-parallel ranks (gloo on CPU, each rank with
its share of the cores) and prints its tokens/s against the single-process engine's.

    uv run python benchmarks/inference_vs_transformers.py                  # CPU, fp32
    uv run python benchmarks/inference_vs_transformers.py --quick          # a smoke run
    uv run python benchmarks/inference_vs_transformers.py --tp 2           # and over 2 ranks
    uv run python benchmarks/inference_vs_transformers.py --device cuda    # bf16, CUDA graphs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from mcore.core.testing import run_ranks
from mcore.core.training.flops import gpt_flops_per_token
from mcore.inference import DynamicInferenceEngine, InferenceConfig, SamplingParams, load_model
from mcore.parallel import ParallelState


def _ffn(args: argparse.Namespace) -> int:
    return 3 * args.hidden


def _kv_heads(args: argparse.Namespace) -> int:
    return max(1, args.heads // 4)


def build_model(args: argparse.Namespace, folder: str) -> None:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=_ffn(args),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=_kv_heads(args),
        max_position_embeddings=args.max_prompt + args.new_tokens + 16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def workload(args: argparse.Namespace) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=g)
    return [torch.randint(3, args.vocab, (int(n),), generator=g).tolist() for n in lengths]


def run_mcore(args: argparse.Namespace, folder: str, prompts: list[list[int]]) -> dict:
    return _mcore_run(args, load_model(folder)[0], prompts)


def _mcore_rank(rank: int, world: int, args, folder: str, prompts: list[list[int]]) -> dict:
    model, _ = load_model(folder, parallel_state=ParallelState(tp=world))
    return _mcore_run(args, model, prompts)


def _mcore_run(args: argparse.Namespace, model: torch.nn.Module, prompts: list[list[int]]) -> dict:
    cuda = args.device == "cuda"
    config = InferenceConfig(
        device=args.device,
        dtype="bfloat16" if cuda else "float32",
        max_requests=args.requests,
        max_tokens=args.step_tokens,
        block_size_tokens=args.block_size,
        max_sequence_length=args.max_prompt + args.new_tokens + 16,
        enable_cuda_graph=cuda and not args.no_cuda_graphs,
    )
    engine = DynamicInferenceEngine(model, config)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    decode_steps = _time_decode_steps(engine, args.device)
    start = time.monotonic()
    outputs = engine.generate(prompts, params)
    _sync(args.device)
    wall = time.monotonic() - start
    ttft = [o.metrics.first_token_time - start for o in outputs]
    tpot = [
        (o.metrics.finished_time - o.metrics.first_token_time) / (len(o.token_ids) - 1)
        for o in outputs
    ]
    note = f"{engine.stats().steps} steps"
    if cuda:
        note += f", {engine.runner.graph_steps} replayed from CUDA graphs"
    if engine.runner.packed_linears:
        note += f"; {engine.runner.packed_linears} linears on oneDNN-packed weights"
    return {
        "tokens": [o.token_ids for o in outputs],
        "wall": wall,
        "ttft": ttft,
        "tpot": tpot,
        "note": note,
        "decode_steps": decode_steps,
    }


def _time_decode_steps(engine: DynamicInferenceEngine, device: str) -> list:
    """Wraps the engine's step; returns the list it fills with ``(seconds, context lengths)``
    of each step whose every request decoded one token."""
    steps: list[tuple[float, list[int]]] = []
    step, execute = engine.step, engine.runner.execute
    seen: list = []

    def timed_execute(chunks):
        seen.append(chunks)
        return execute(chunks)

    def timed_step():
        seen.clear()
        start = time.perf_counter()
        out = step()
        _sync(device)
        chunks = seen[0] if seen else []
        if chunks and all(c.num_tokens == 1 for c in chunks):
            steps.append((time.perf_counter() - start, [c.start + 1 for c in chunks]))
        return out

    engine.runner.execute, engine.step = timed_execute, timed_step
    return steps


def gemm_flops_per_s(args: argparse.Namespace) -> tuple[float, str]:
    """The throughput of one representative matmul on this machine, and its shape."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    m, k, n = 2048, args.hidden, 2 * _ffn(args)
    a = torch.randn(m, k, dtype=dtype, device=args.device)
    b = torch.randn(k, n, dtype=dtype, device=args.device)
    best = float("inf")
    for _ in range(3):
        torch.mm(a, b)
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        _sync(args.device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * m * k * n / best, f"[{m}x{k}]x[{k}x{n}] {str(dtype).removeprefix('torch.')}"


def decode_floor(args: argparse.Namespace, steps: list, flops_per_s: float) -> tuple[float, float]:
    """Mean measured seconds of the decode steps and mean seconds their FLOPs take at
    ``flops_per_s``."""
    heads = args.heads

    def forward_flops(context: int) -> float:
        training = gpt_flops_per_token(
            args.layers, args.hidden, _ffn(args), heads, _kv_heads(args), args.vocab, context
        )
        return training / 3  # forward only

    measured = sum(t for t, _ in steps) / len(steps)
    flops = sum(sum(forward_flops(c) for c in contexts) for _, contexts in steps) / len(steps)
    return measured, flops / flops_per_s


class _StepClock(transformers.LogitsProcessor):
    """Records when each decoding step of ``generate`` runs."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.monotonic())
        return scores


def run_transformers(args: argparse.Namespace, folder: str, prompts: list[list[int]]) -> dict:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = model.to(args.device).eval()
    model.generation_config.eos_token_id = None

    def generate(batch: list[list[int]], new_tokens: int, clock: _StepClock | None):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=[clock] if clock else None,
            )
        return out[:, width:].tolist()

    generate([prompts[0][:8]], 4, None)  # warm-up
    tokens, ttft, tpot = [], [], []
    start = time.monotonic()
    for i in range(0, len(prompts), args.hf_batch_size):
        batch = prompts[i : i + args.hf_batch_size]
        clock = _StepClock(args.device)
        tokens += generate(batch, args.new_tokens, clock)
        _sync(args.device)
        done = time.monotonic()
        first = clock.times[0]
        ttft += [first - start] * len(batch)
        tpot += [(done - first) / (args.new_tokens - 1)] * len(batch)
    wall = time.monotonic() - start
    return {"tokens": tokens, "wall": wall, "ttft": ttft, "tpot": tpot, "note": ""}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: all requests")
    parser.add_argument("--step-tokens", type=int, default=2048, help="inference.max_tokens")
    parser.add_argument("--block-size", type=int, default=64, help="KV-cache block size")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs; the median")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument(
        "--tp", type=int, default=1, help="also run mcore over this many tensor-parallel ranks"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_prompt, args.new_tokens = 8, 64, 16
        args.layers, args.hidden, args.vocab, args.repeat = 2, 128, 1024, 1
    args.hf_batch_size = args.hf_batch_size or args.requests
    if args.device == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as folder:
        build_model(args, folder)
        prompts = workload(args)
        runs = []
        for _ in range(args.repeat):  # alternated, so a busy spell hits every side alike
            run = [run_mcore(args, folder, prompts), run_transformers(args, folder, prompts)]
            if args.tp > 1:
                backend = "nccl" if args.device == "cuda" else "gloo"
                ranks = run_ranks(_mcore_rank, args.tp, args, folder, prompts, backend=backend)
                run.append(ranks[0])
            runs.append(run)
        flops_per_s, gemm = gemm_flops_per_s(args)
    # The run of median wall time of each side.
    ours, theirs, *tp = (
        sorted((r[i] for r in runs), key=lambda r: r["wall"])[len(runs) // 2]
        for i in range(len(runs[0]))
    )

    total = args.requests * args.new_tokens
    same = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"], strict=True))
    lengths = [len(p) for p in prompts]
    print(
        f"{args.device}, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
        f"{args.requests} requests, prompts {min(lengths)}-{max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}), {args.new_tokens} new tokens each; "
        f"transformers batch {args.hf_batch_size}, threads {torch.get_num_threads()}; "
        f"median of {args.repeat} alternated runs"
    )
    rows = [("mcore engine", ours), ("transformers", theirs)]
    if tp:
        rows.append((f"mcore TP{args.tp}", tp[0]))
    print(f"{'':14} {'tokens/s':>10} {'TTFT ms':>10} {'TPOT ms':>10}  notes")
    for name, r in rows:
        print(
            f"{name:14} {total / r['wall']:10.1f} {1e3 * statistics.mean(r['ttft']):10.1f} "
            f"{1e3 * statistics.mean(r['tpot']):10.2f}  {r['note']}"
        )
    print(
        f"mcore / transformers: tokens/s {theirs['wall'] / ours['wall']:.3f}, "
        f"TTFT {statistics.mean(ours['ttft']) / statistics.mean(theirs['ttft']):.3f}, "
        f"TPOT {statistics.mean(ours['tpot']) / statistics.mean(theirs['tpot']):.3f}; "
        f"greedy generations equal: {same}/{args.requests}"
    )
    measured, floor = decode_floor(args, ours["decode_steps"], flops_per_s)
    batch = statistics.mean(len(c) for _, c in ours["decode_steps"])
    print(
        f"mcore decode step: {1e3 * measured:.2f} ms measured (mean of "
        f"{len(ours['decode_steps'])} decode-only steps, {batch:.0f} requests), compute floor "
        f"{1e3 * floor:.2f} ms at {flops_per_s / 1e9:.0f} GFLOP/s ({gemm} matmul here): "
        f"{measured / floor:.2f}x the floor"
    )
    if tp:
        agree = sum(a == b for a, b in zip(tp[0]["tokens"], ours["tokens"], strict=True))
        print(
            f"mcore TP{args.tp} / TP1: tokens/s {ours['wall'] / tp[0]['wall']:.3f}, "
            f"TPOT {statistics.mean(tp[0]['tpot']) / statistics.mean(ours['tpot']):.3f}; "
            f"greedy generations equal to TP1: {agree}/{args.requests}"
        )


if __name__ == "__main__":
    main()
