"""Hybrid models (Mamba-2 + attention + MLP/MoE): mcore against transformers' Nemotron-H.

One layer pattern (``M`` Mamba-2, ``*`` attention without rope, ``-`` MLP with squared ReLU,
``E`` MoE with a sigmoid router, score bias and a shared expert) sizes both sides; each side's
config is built from the same flags, and mcore's own Nemotron-H export of its run config is
checked to give the same ``NemotronHConfig`` fields. Two measurements (``--what``):

- train: tokens/s of ``mcore train``'s full step (data, DDP, AdamW, clipping, schedule) against
  a plain transformers loop (AdamW, clipping) of ``NemotronHForCausalLM`` on random tokens of
  the same shape; fp32, same batch and sequence length and vocab (mcore's byte tokenizer
  padded to 384). mcore runs first; the median step after 2 warm-up steps of each.
- decode: a random ``NemotronHForCausalLM`` saved once is loaded by mcore's
  ``DynamicInferenceEngine`` (``load_model``, imported through ``mcore.ssm.hf``) and by
  transformers; ``--requests`` requests arrive at once with random prompt lengths and decode
  ``--new-tokens`` greedily with end-of-sequence ignored; transformers runs one batched
  ``generate`` (left padding, attention mask). Two prompts are first checked to decode alike.
  Reported: output tokens/s, mean time to first token and per output token after it (TPOT).

transformers warns that ``mamba_ssm`` / ``causal_conv1d`` are missing and runs its pure-torch
Mamba-2 path: that is what is measured (mcore: its torch chunked scan; ``--ssm-kernel triton``
trains with mcore-ssm's Triton kernels on CUDA). Ratios are mcore / transformers: tokens/s
above 1, TTFT and TPOT below 1 mean mcore is faster.

    uv run python benchmarks/hybrid_vs_transformers.py                  # CPU, fp32, both
    uv run python benchmarks/hybrid_vs_transformers.py --quick          # tiny sizes, a smoke run
    uv run python benchmarks/hybrid_vs_transformers.py --what decode --pattern "M*M-ME"
    uv run python benchmarks/hybrid_vs_transformers.py --device cuda    # decode in bf16, graphs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
import transformers

from mcore.core import load_config
from mcore.core.training.loop import train
from mcore.inference import DynamicInferenceEngine, InferenceConfig, SamplingParams, load_model
from mcore.ssm.hf import NEMOTRON_H

TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
TRAIN_VOCAB = 384  # what mcore train builds: the byte tokenizer's 263 ids padded to 128s
QUICK = dict(pattern="M*-E", hidden=64, heads=4, kv_heads=2, mamba_head_dim=16, groups=2,
             state=16, chunk=16, experts=4, seq=64, mbs=2, steps=6, requests=4, max_prompt=32,
             new_tokens=8, vocab=512, repeat=1)  # fmt: skip
SCALED = {"head_dim": lambda a: a.hidden // a.heads, "ffn": lambda a: 4 * a.hidden,
          "mamba_heads": lambda a: 2 * a.hidden // a.mamba_head_dim,
          "moe_ffn": lambda a: a.hidden, "shared_ffn": lambda a: 2 * a.hidden}  # fmt: skip


def hf_config(a: argparse.Namespace, vocab: int) -> transformers.NemotronHConfig:
    return transformers.NemotronHConfig(
        vocab_size=vocab, hidden_size=a.hidden, layers_block_type=[TYPES[s] for s in a.pattern],
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
        intermediate_size=a.ffn, mlp_hidden_act="relu2", mamba_num_heads=a.mamba_heads,
        mamba_head_dim=a.mamba_head_dim, n_groups=a.groups, ssm_state_size=a.state,
        chunk_size=a.chunk, conv_kernel=a.conv, n_routed_experts=a.experts,
        num_experts_per_tok=a.topk, moe_intermediate_size=a.moe_ffn,
        moe_shared_expert_intermediate_size=a.shared_ffn, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.0, max_position_embeddings=a.max_len,
        tie_word_embeddings=False, initializer_range=a.init, time_step_min=0.001,
    )  # fmt: skip


def mcore_overrides(a: argparse.Namespace) -> dict[str, str]:
    o = {
        "model.num-layers": len(a.pattern), "model.hybrid-override-pattern": a.pattern,
        "model.hidden-size": a.hidden, "model.num-attention-heads": a.heads,
        "model.num-query-groups": a.kv_heads, "model.kv-channels": a.head_dim,
        "model.ffn-hidden-size": a.ffn, "model.activation": "squared_relu",
        "model.position-embedding-type": "none", "model.max-position-embeddings": a.max_len,
        "model.untie-embeddings-and-output-weights": "true", "model.init-method-std": a.init,
        "ssm.mamba-num-heads": a.mamba_heads, "ssm.mamba-head-dim": a.mamba_head_dim,
        "ssm.mamba-num-groups": a.groups, "ssm.mamba-state-dim": a.state,
        "ssm.mamba-chunk-size": a.chunk, "ssm.mamba-conv-kernel": a.conv,
        "ssm.mamba-dt-limit-min": 0.001, "ssm.ssm-kernel": a.ssm_kernel,
    }  # fmt: skip
    if "E" in a.pattern:
        o |= {
            "moe.num-experts": a.experts, "moe.ffn-hidden-size": a.moe_ffn,
            "moe.router-topk": a.topk, "moe.router-score-function": "sigmoid",
            "moe.router-norm-topk-prob": "true", "moe.router-enable-expert-bias": "true",
            "moe.router-topk-scaling-factor": 1.0,
            "moe.shared-expert-intermediate-size": a.shared_ffn,
        }  # fmt: skip
    return {k: str(v) for k, v in o.items()}


def check_equivalent(config, hf: transformers.NemotronHConfig) -> None:
    """mcore's Nemotron-H export of the run config agrees with ``hf`` on every shared field."""
    sections = {n: getattr(config, n) for n in ("ssm", "moe") if n in config.section_names()}
    model = dataclasses.replace(config.model, vocab_size=hf.vocab_size)
    ours, theirs = NEMOTRON_H.from_config(model, sections), hf.to_dict()
    ours.pop("architectures")  # set by transformers only when saving
    bad = {k: (v, theirs[k]) for k, v in ours.items() if k in theirs and v != theirs[k]}
    assert not bad, f"mcore and transformers configs differ (mcore, transformers): {bad}"


def bench_train(a: argparse.Namespace) -> None:
    overrides = {
        "train.train-iters": a.steps, "train.micro-batch-size": a.mbs, "train.seq-length": a.seq,
        "train.device": a.device, "logger.log-interval": 10**6,
    }  # fmt: skip
    config = load_config(overrides=mcore_overrides(a) | {k: str(v) for k, v in overrides.items()})
    hf = hf_config(a, TRAIN_VOCAB)
    check_equivalent(config, hf)
    ours = statistics.median(train(config).step_seconds[2:])

    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(hf).to(a.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    ids = torch.randint(0, TRAIN_VOCAB, (a.mbs, a.seq), device=a.device)
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(a.device)
        times.append(time.perf_counter() - start)
    theirs = statistics.median(times[2:])
    tokens = a.mbs * a.seq
    print(f"train: pattern {a.pattern}, hidden {a.hidden}, {a.mbs}x{a.seq} tokens/step, fp32, "
          f"{a.device}, {torch.get_num_threads()} threads, steps 3-{a.steps}")  # fmt: skip
    print(f"  transformers loop: {tokens / theirs:8.0f} tokens/s")
    print(f"  mcore train step:  {tokens / ours:8.0f} tokens/s")
    print(f"  ratio mcore / transformers (tokens/s): {theirs / ours:.3f}")


class _StepClock(transformers.LogitsProcessor):
    """Records when each decoding step of ``generate`` runs."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.monotonic())
        return scores


def bench_decode(a: argparse.Namespace) -> None:
    cuda = a.device == "cuda"
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(a.min_prompt, a.max_prompt + 1, (a.requests,), generator=g)
    prompts = [torch.randint(3, a.vocab, (int(n),), generator=g).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.NemotronHForCausalLM(hf_config(a, a.vocab)).save_pretrained(folder)
        dtype = torch.bfloat16 if cuda else torch.float32
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        hf = hf.to(a.device).eval()
        model, _ = load_model(folder)
    hf.generation_config.eos_token_id = None
    engine = DynamicInferenceEngine(model, InferenceConfig(
        device=a.device, dtype="bfloat16" if cuda else "float32", max_requests=a.requests,
        max_tokens=a.step_tokens, block_size_tokens=a.block_size, max_sequence_length=a.max_len,
        enable_cuda_graph=cuda and not a.no_cuda_graphs,
    ))  # fmt: skip
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)

    def hf_generate(batch: list[list[int]], clock: _StepClock | None = None) -> list[list[int]]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=a.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask.to(a.device), do_sample=False,
                              max_new_tokens=a.new_tokens, pad_token_id=0,
                              logits_processor=[clock] if clock else None)  # fmt: skip
        return out[:, width:].tolist()

    alone = 0  # agreement first (also the warm-up of both); bf16 may differ, fp32 must not
    for p in prompts[:2]:
        ours, theirs = engine.generate([p], params)[0].token_ids, hf_generate([p])[0]
        assert cuda or ours == theirs, f"greedy outputs differ:\n{ours}\n{theirs}"
        alone += ours == theirs
    runs: dict[str, list[dict]] = {"mcore engine": [], "transformers": []}
    for _ in range(a.repeat):  # alternated, so a busy spell hits both alike
        start = time.monotonic()
        outs = engine.generate(prompts, params)
        _sync(a.device)
        wall = time.monotonic() - start
        runs["mcore engine"].append({
            "tokens": [o.token_ids for o in outs], "wall": wall,
            "ttft": statistics.mean(o.metrics.first_token_time - start for o in outs),
            "tpot": statistics.mean((o.metrics.finished_time - o.metrics.first_token_time)
                                    / (len(o.token_ids) - 1) for o in outs),
        })  # fmt: skip
        clock = _StepClock(a.device)
        start = time.monotonic()
        tokens = hf_generate(prompts, clock)
        _sync(a.device)
        wall = time.monotonic() - start
        runs["transformers"].append({
            "tokens": tokens, "wall": wall, "ttft": clock.times[0] - start,
            "tpot": (start + wall - clock.times[0]) / (a.new_tokens - 1),
        })  # fmt: skip
    r = {k: sorted(v, key=lambda x: x["wall"])[len(v) // 2] for k, v in runs.items()}
    ours, theirs = r["mcore engine"], r["transformers"]
    same = sum(x == y for x, y in zip(ours["tokens"], theirs["tokens"], strict=True))
    print(f"decode: pattern {a.pattern}, hidden {a.hidden}, vocab {a.vocab}, {a.device}, "
          f"{'bf16' if cuda else 'fp32'}; {a.requests} requests, prompts {min(lengths)}-"
          f"{max(lengths)} tokens, {a.new_tokens} new each; {torch.get_num_threads()} threads; "
          f"median of {a.repeat} alternated runs")  # fmt: skip
    total = a.requests * a.new_tokens
    print(f"  {'':13} {'tokens/s':>9} {'TTFT ms':>9} {'TPOT ms':>9}")
    for name, x in r.items():
        print(f"  {name:13} {total / x['wall']:9.1f} {1e3 * x['ttft']:9.1f} {1e3 * x['tpot']:9.2f}")
    print(f"  ratio mcore / transformers: tokens/s {theirs['wall'] / ours['wall']:.3f}, TTFT "
          f"{ours['ttft'] / theirs['ttft']:.3f}, TPOT {ours['tpot'] / theirs['tpot']:.3f}; "
          f"greedy generations equal: {same}/{a.requests} ({alone}/2 checked alone)")  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    epilog = ("Unset sizes follow --hidden: head-dim hidden/heads, ffn 4x, mamba-heads 2x "
              "hidden/mamba-head-dim, moe-ffn 1x, shared-ffn 2x. --vocab is decode's; "
              f"training uses mcore's {TRAIN_VOCAB}.")  # fmt: skip
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=epilog)
    add = p.add_argument
    add("--what", choices=["train", "decode", "both"], default="both")
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--pattern", "--layers", default="M*M-M*M-", help="one symbol per layer: M * - E")
    for name, default in [("hidden", 256), ("heads", 4), ("kv-heads", 2), ("head-dim", None),
                          ("ffn", None), ("mamba-heads", None), ("mamba-head-dim", 64),
                          ("groups", 2), ("state", 64), ("chunk", 128), ("conv", 4),
                          ("experts", 8), ("topk", 2), ("moe-ffn", None), ("shared-ffn", None),
                          ("seq", 256), ("mbs", 8), ("steps", 12), ("requests", 32),
                          ("min-prompt", 16), ("max-prompt", 256), ("new-tokens", 64),
                          ("vocab", 8192), ("step-tokens", 2048), ("block-size", 64),
                          ("repeat", 3)]:  # fmt: skip
        add(f"--{name}", type=int, default=default)
    add("--init", type=float, default=0.02, help="initializer_range / init-method-std")
    add("--ssm-kernel", choices=["torch", "triton"], default="torch", help="mcore train's scan")
    add("--no-cuda-graphs", action="store_true")
    add("--quick", action="store_true", help="tiny sizes, a smoke run")
    a = p.parse_args()
    if not a.pattern or set(a.pattern) - set(TYPES):
        p.error(f"--pattern {a.pattern!r}: one symbol per layer, each of M * - E")
    if a.quick:
        for key, value in QUICK.items():
            setattr(a, key, value)
    for key, size in SCALED.items():
        if getattr(a, key) is None:
            setattr(a, key, size(a))
    a.max_len = max(a.seq, a.max_prompt + a.new_tokens + 16)
    if a.what in ("train", "both"):
        bench_train(a)
    if a.what in ("decode", "both"):
        bench_decode(a)


if __name__ == "__main__":
    main()
