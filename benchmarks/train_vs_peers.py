"""Training throughput of ``mcore train``'s full step against its peers, dense and MoE.

Two shapes (one process, fp32, AdamW, ``--threads`` intra-op threads for every contender):

- dense: a Llama of 4 layers, hidden 256, 4 query / 2 key-value heads, SwiGLU ffn 688,
  vocab 8192, tied embeddings (mcore's default), RMSNorm, rope; 8 x 256 tokens per step;
- moe: the same with every MLP a Mixtral MoE: 8 experts of ffn ``--expert-ffn`` (688), top-2,
  softmax over the chosen logits, no balancing loss, no shared expert.

Contenders, run in turn within each round (``--rounds``, alternating so that a busy spell on
the machine hits all of them alike), each for ``--steps`` steps of which the first
``--warmup`` are dropped; every contender builds its model afresh and frees it afterwards:

- ``mcore``: the real ``mcore train`` step through ``mcore.core.training.loop.train``
  (data from the built-in corpus, DDP wrapper, optimizer wrapper with clipping, LR schedule,
  loss reduction), timed by ``TrainResult.step_seconds``. The corpus is byte-tokenized (ids
  below 263); ``model.vocab-size 8192`` makes the model's vocabulary 8192 all the same, so
  embedding and output layer have the peers' size. MoE: ``moe.grouped-gemm true`` (one
  ``torch._grouped_mm`` for all experts, the fastest on CPU per ``moe_vs_transformers.py``)
  and the ``--moe-dispatcher`` token dispatcher (alltoall, mcore's default).
- ``transformers``: ``LlamaForCausalLM`` / ``MixtralForCausalLM`` (SDPA attention) in a plain
  loop: forward with its own loss, backward, ``clip_grad_norm_``, AdamW, cosine schedule.
  MoE runs once per ``--hf-experts`` implementation (``grouped_mm``, the default transformers
  picks for models, and ``eager``, its loop over the experts hit); the best one is the peer.
  (``batched_mm`` gathers a weight copy per routed token: gigabytes at this shape.)
- ``mcore (compile)`` (``--compile``): the same with ``train.compile on`` (each transformer
  layer compiled by inductor; compilation falls in the untimed warm-up steps).
- ``torchtitan`` (when importable): its ``Llama3Model`` built from its config objects (fused
  QKV, weight tying; for MoE its ``MoE`` with ``GroupedExperts``, softmax router with the
  top-k renormalised, no load-balancing bias, in ``Qwen3TransformerBlock``, which without
  qk-norm is a Llama block with an MoE), ``init_states``, in the same plain loop. CPU shims:
  none, only choices: no ``parallelize_llama`` (FSDP/TP need a device mesh), CPU device, no
  ``torch.compile``, and its ``ScaledDotProductAttention`` as the inner attention (causal
  SDPA; its config helper offers language models only flex or varlen attention, which need
  compilation or CUDA). Its ``GroupedExperts`` computes the expert matmuls in bf16 whatever
  the weights' dtype (a hard-coded ``.bfloat16()``), so its MoE row is not fp32 compute.
  Written against torchtitan 0.3.0 (its config-object API changes between releases).
- ``megatron-core`` (when importable): ``GPTModel`` with the local (no Transformer Engine)
  layer spec, ``SequentialMLP`` experts (its grouped experts need TE or the grouped_gemm
  CUDA package) and the allgather dispatcher (the alltoall one creates a CUDA stream), in
  the same plain loop with torch's AdamW (its DDP and optimizer wrappers allocate CUDA
  buffers). CPU shims, applied only while it runs: a one-rank gloo process group and
  ``initialize_model_parallel()``, both torn down afterwards; ``use_cpu_initialization=True``
  and every fusion off (bias-activation, masked softmax, rope, cross entropy, gradient
  accumulation); ``torch.cuda.current_device`` patched to return ``"cpu"`` (layers, rope and
  router place tensors on it); the CUDA RNG tracker's ``fork`` made a no-op (dropout is 0);
  an explicit causal mask (its default one is made with ``device="cuda"``); and
  ``moe_utils.te_general_gemm = None`` (without TE, 0.16.1 leaves the name undefined but
  tests it). Written against megatron-core 0.16.1 (the last release for Python 3.11).

Neither torchtitan nor megatron-core is a dependency of this workspace. To run them, install
them beside it without touching the environment (``--no-deps``: torch and numpy come from the
workspace; the three small extras are torchtitan's imports), e.g.::

    uv pip install --python .venv/bin/python --no-deps --target /tmp/peers \\
        torchtitan==0.3.0 megatron-core==0.16.1 spmd_types==0.2.3 tyro docstring-parser
    PYTHONPATH=/tmp/peers uv run python benchmarks/train_vs_peers.py

All peers get mcore's optimizer defaults (``OptimizerConfig``: lr, betas, eps, weight decay
with none on 1-D parameters, clipping at 1.0, cosine decay over the run) and random tokens of
the same shape. Prints per-round tokens/s (each the median of the round's timed
steps), then per shape each contender's median over all rounds' timed steps and its best
round, and the ratio mcore / best peer on both (above 1: mcore is faster; the issue's target
is 1.15). On a shared machine the best round is the steadier figure: load from other jobs only
slows a contender down.

    uv run python benchmarks/train_vs_peers.py                        # both shapes, 2 rounds
    uv run python benchmarks/train_vs_peers.py --shape dense --rounds 3
    uv run python benchmarks/train_vs_peers.py --steps 3 --warmup 1 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from mcore.core import load_config
from mcore.core.sections import OptimizerConfig
from mcore.core.training.loop import train

OPT = OptimizerConfig()  # mcore's defaults: every peer's AdamW uses the same


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 688
    vocab: int = 8192
    mbs: int = 8
    seq: int = 256
    experts: int | None = None
    topk: int = 2
    expert_ffn: int = 688

    @property
    def tokens(self) -> int:
        return self.mbs * self.seq

    def describe(self) -> str:
        mlp = (
            f"MoE {self.experts} experts of ffn {self.expert_ffn}, top-{self.topk}"
            if self.experts
            else f"ffn {self.ffn}"
        )
        return (
            f"{self.name}: {self.layers} layers, hidden {self.hidden}, GQA "
            f"{self.heads}/{self.kv_heads}, {mlp}, vocab {self.vocab}, tied embeddings, "
            f"{self.mbs}x{self.seq} tokens/step, fp32 AdamW"
        )


# --- mcore -------------------------------------------------------------------------------


def run_mcore(shape: Shape, args: argparse.Namespace, *, compile: bool = False) -> list[float]:
    """``mcore train``'s loop on ``shape`` (``compile``: ``train.compile on``, each layer
    compiled with inductor); the seconds of every step."""
    o: dict[str, Any] = {
        "train.train-iters": args.steps,
        "train.micro-batch-size": shape.mbs,
        "train.seq-length": shape.seq,
        "train.device": "cpu",
        "model.num-layers": shape.layers,
        "model.hidden-size": shape.hidden,
        "model.num-attention-heads": shape.heads,
        "model.num-query-groups": shape.kv_heads,
        "model.ffn-hidden-size": shape.ffn,
        "model.vocab-size": shape.vocab,
        "logger.log-interval": 10**6,
        "logger.progress-bar": "false",
        "logger.log-level": "info" if args.verbose else "warning",
    }
    if compile:
        o["train.compile"] = "on"
    if shape.experts:
        o |= {
            "moe.num-experts": shape.experts,
            "moe.router-topk": shape.topk,
            "moe.ffn-hidden-size": shape.expert_ffn,
            "moe.grouped-gemm": "true",
            "moe.token-dispatcher-type": args.moe_dispatcher,
        }
    config = load_config(overrides={k: str(v) for k, v in o.items()})
    # Its console lines (startup times, the last step's metrics) only with --verbose.
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO()):
        return list(train(config).step_seconds)


# --- the peers' plain loop ---------------------------------------------------------------


def plain_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Shape,
    steps: int,
) -> list[float]:
    """A training loop as a user writes one: zero grads, forward with the model's loss,
    backward, clip, AdamW (mcore's hyper-parameters), LR schedule; the seconds of each step.
    ``loss_fn(inputs, labels)``: inputs and next-token labels, ``[mbs, seq]`` each."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPT.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=OPT.lr, betas=(OPT.adam_beta1, OPT.adam_beta2), eps=OPT.adam_eps,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    params = decay + no_decay
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.mbs, shape.seq + 1), generator=g)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPT.clip_grad)
        optimizer.step()
        schedule.step()
        if not math.isfinite(value := float(loss.detach())):
            raise RuntimeError(f"non-finite loss {value}")
        times.append(time.perf_counter() - start)
    return times


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


# --- transformers ------------------------------------------------------------------------


def hf_model(shape: Shape, experts_implementation: str | None) -> torch.nn.Module:
    common = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_cache=False,  # training: no key/value cache built in forward
    )  # fmt: skip
    torch.manual_seed(0)
    if not shape.experts:
        config = transformers.LlamaConfig(intermediate_size=shape.ffn, **common)
        config._attn_implementation = "sdpa"
        return transformers.LlamaForCausalLM(config)
    config = transformers.MixtralConfig(
        intermediate_size=shape.expert_ffn, num_local_experts=shape.experts,
        num_experts_per_tok=shape.topk, router_jitter_noise=0.0, output_router_logits=False,
        experts_implementation=experts_implementation, **common,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return transformers.MixtralForCausalLM(config)


def run_transformers(shape: Shape, args: argparse.Namespace, impl: str | None) -> list[float]:
    model = hf_model(shape, impl)
    if shape.experts:
        got = model.config._experts_implementation
        assert got == impl, f"asked transformers for {impl} experts, it chose {got}"

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Its own causal-LM loss (shifts internally): labels are the inputs.
        return model(input_ids=inputs, labels=inputs).loss

    return plain_loop(model, loss_fn, shape, args.steps)


# --- TorchTitan (untested unless importable; see the docstring) --------------------------


def torchtitan_model(shape: Shape) -> torch.nn.Module:
    """A TorchTitan (0.3.0) Llama-3 / Mixtral-like model of ``shape`` on the CPU."""
    from functools import partial

    from torch import nn
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import (
        make_ffn_config,
        make_gqa_config,
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )
    from torchtitan.models.common.param_init import skip_param_init
    from torchtitan.models.llama3 import Llama3Model, Llama3TransformerBlock
    from torchtitan.models.qwen3.model import Qwen3TransformerBlock

    init = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}

    def norm() -> RMSNorm.Config:
        return RMSNorm.Config(
            normalized_shape=shape.hidden, param_init={"weight": nn.init.ones_}, eps=1e-5
        )

    head_dim = shape.hidden // shape.heads
    rope = ComplexRoPE.Config(dim=head_dim, max_seq_len=shape.seq, theta=10000.0)
    layers = []
    for _ in range(shape.layers):
        attention = make_gqa_config(
            dim=shape.hidden, n_heads=shape.heads, n_kv_heads=shape.kv_heads,
            wqkv_param_init=init, wo_param_init=init, fuse_qkv=True, rope=rope,
            inner_attention=ScaledDotProductAttention.Config(),
        )  # fmt: skip
        if not shape.experts:
            ffn = make_ffn_config(
                dim=shape.hidden, hidden_dim=shape.ffn, w1_param_init=init, w2w3_param_init=init
            )
            layers.append(
                Llama3TransformerBlock.Config(
                    attention_norm=norm(), ffn_norm=norm(), attention=attention, feed_forward=ffn
                )
            )
            continue
        moe = make_moe_config(
            num_experts=shape.experts,
            router=make_router_config(
                dim=shape.hidden, num_experts=shape.experts, gate_param_init=init,
                top_k=shape.topk, score_func="softmax", route_norm=True,
            ),
            routed_experts=make_routed_experts_config(
                dim=shape.hidden, hidden_dim=shape.expert_ffn, num_experts=shape.experts,
                top_k=shape.topk, comm_backend="standard",
                param_init={f"w{i}_{dims}": init["weight"] for i, dims in ((1, "EFD"),
                            (2, "EDF"), (3, "EFD"))},
            ),
            load_balance_coeff=None,
        )  # fmt: skip
        layers.append(
            Qwen3TransformerBlock.Config(
                attention_norm=norm(), ffn_norm=norm(), attention=attention, moe=moe
            )
        )
    config = Llama3Model.Config(
        dim=shape.hidden, vocab_size=shape.vocab, enable_weight_tying=True,
        tok_embeddings=Embedding.Config(num_embeddings=shape.vocab, embedding_dim=shape.hidden,
                                        param_init={"weight": skip_param_init}),
        norm=norm(),
        lm_head=Linear.Config(in_features=shape.hidden, out_features=shape.vocab,
                              param_init=init),
        layers=layers,
    )  # fmt: skip
    torch.manual_seed(0)
    model = config.build()
    model.init_states(buffer_device=torch.device("cpu"))
    return model


def run_torchtitan(shape: Shape, args: argparse.Namespace) -> list[float]:
    model = torchtitan_model(shape)
    return plain_loop(model, lambda x, y: token_ce(model(x), y), shape, args.steps)


# --- Megatron-Core (untested unless importable; see the docstring) -----------------------


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """The CPU shims Megatron-Core needs (see the docstring), undone on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    # 0.16.1 without Transformer Engine leaves this name undefined, yet tests it for None.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    saved_device, saved_fork = torch.cuda.current_device, mrandom.CudaRNGStatesTracker.fork
    started = not dist.is_initialized()
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    mrandom.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    try:
        if started:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started and dist.is_initialized():
            dist.destroy_process_group()  # or mcore's next run would see a process group
        torch.cuda.current_device = saved_device  # type: ignore[assignment]
        mrandom.CudaRNGStatesTracker.fork = saved_fork


def megatron_model(shape: Shape) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    moe: dict[str, Any] = {}
    if shape.experts:
        moe = dict(
            num_moe_experts=shape.experts, moe_router_topk=shape.topk,
            moe_ffn_hidden_size=shape.expert_ffn, moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        )  # fmt: skip
    config = TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, ffn_hidden_size=shape.ffn, gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False, **moe,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(
        num_experts=shape.experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    torch.manual_seed(0)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=shape.vocab,
        max_sequence_length=shape.seq, position_embedding_type="rope", rotary_base=10000,
        share_embeddings_and_output_weights=True,
    )  # fmt: skip


def run_megatron(shape: Shape, args: argparse.Namespace) -> list[float]:
    with megatron_on_cpu():
        model = megatron_model(shape)
        positions = torch.arange(shape.seq).expand(shape.mbs, -1)
        causal = torch.ones(shape.seq, shape.seq, dtype=torch.bool).triu(1)[None, None]

        def loss_fn(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            per_token = model(inputs, positions, causal, labels=labels)  # [mbs, seq]
            return per_token.float().mean()

        return plain_loop(model, loss_fn, shape, args.steps)


# --- the rounds --------------------------------------------------------------------------


def importable(*modules: str) -> str | None:
    """None when every module imports, else why not."""
    for name in modules:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                return f"{name.split('.')[0]} is not installed"
            importlib.import_module(name)
        except Exception as e:  # a broken install counts as absent
            return f"{name}: {type(e).__name__}: {e}"
    return None


def contenders(shape: Shape, args: argparse.Namespace) -> dict[str, Callable[[], list[float]]]:
    runs: dict[str, Callable[[], list[float]]] = {"mcore": lambda: run_mcore(shape, args)}
    if args.compile:
        runs["mcore (compile)"] = lambda: run_mcore(shape, args, compile=True)
    if shape.experts:
        for impl in args.hf_experts.split(","):
            runs[f"transformers ({impl})"] = (
                lambda i=impl: run_transformers(shape, args, i)  # type: ignore[misc]
            )
    else:
        runs["transformers"] = lambda: run_transformers(shape, args, None)
    optional = {
        "torchtitan": (("torchtitan.models.llama3", "torchtitan.models.qwen3.model"),
                       lambda: run_torchtitan(shape, args)),
        "megatron-core": (("megatron.core.models.gpt",), lambda: run_megatron(shape, args)),
    }  # fmt: skip
    for name, (modules, run) in optional.items():
        if name in args.skip:
            continue
        why = importable(*modules)
        if why is None:
            runs[name] = run
        elif shape.name == args.shapes[0]:
            print(f"  ({name} skipped: {why})")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="both", choices=["dense", "moe", "both"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per contender per round")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run not timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=688)
    parser.add_argument("--moe-dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    parser.add_argument(
        "--hf-experts", default="grouped_mm,eager", help="transformers' experts implementations"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also run mcore with train.compile on (inductor, each layer compiled; the "
        "compilation falls in the warm-up steps)",
    )
    parser.add_argument("--verbose", action="store_true", help="show mcore train's console")
    parser.add_argument(
        "--skip", default="", help="comma-separated optional peers not to run (torchtitan, ...)"
    )
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    args.skip = set(filter(None, args.skip.split(",")))
    args.shapes = ["dense", "moe"] if args.shape == "both" else [args.shape]
    torch.set_num_threads(args.threads)
    # The optional peers' import-time and CPU-fallback warnings (no TE, no apex, autocast).
    warnings.filterwarnings("ignore", module=r"(torchtitan|megatron)(\.|$)")
    warnings.filterwarnings("ignore", message="In CPU autocast")
    shapes = {
        "dense": Shape("dense"),
        "moe": Shape("moe", experts=8, expert_ffn=args.expert_ffn),
    }
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, CPU, "
          f"{torch.get_num_threads()} threads; {args.rounds} round(s) of {args.steps} steps "
          f"per contender, the first {args.warmup} of each untimed")  # fmt: skip
    summary = []
    for shape_name in args.shapes:
        shape = shapes[shape_name]
        runs = contenders(shape, args)
        print(shape.describe())
        timed: dict[str, list[float]] = {name: [] for name in runs}
        best_round: dict[str, float] = dict.fromkeys(runs, 0.0)
        for r in range(1, args.rounds + 1):
            row = []
            for name, run in runs.items():
                seconds = run()[args.warmup :]
                gc.collect()  # the contender's model and optimizer go before the next builds
                timed[name] += seconds
                rate = shape.tokens / statistics.median(seconds)
                best_round[name] = max(best_round[name], rate)
                row.append(f"{name} {rate:7.0f}")
            print(f"  round {r} tokens/s: " + " | ".join(row), flush=True)
        # The median over every timed step, and the best round's median: load from other jobs
        # only ever slows a contender down, so the best round is the less disturbed figure.
        rates = {name: shape.tokens / statistics.median(s) for name, s in timed.items()}
        for label, figures in (("median", rates), ("best round", best_round)):
            peers = {n: rate for n, rate in figures.items() if not n.startswith("mcore")}
            best = max(peers, key=peers.__getitem__)
            for name, rate in figures.items():
                if name.startswith("mcore"):
                    ratio = rate / peers[best]
                    summary.append((shape_name, label, name, rate, best, peers[best], ratio))
        print(f"  {'contender':>26}  {'median tok/s':>12}  {'ms/step':>7}  {'best round':>10}  "
              f"mcore / this (median)")  # fmt: skip
        for name, rate in rates.items():
            print(f"  {name:>26}  {rate:12.0f}  {shape.tokens / rate * 1e3:7.1f}  "
                  f"{best_round[name]:10.0f}  {rates['mcore'] / rate:.3f}")  # fmt: skip
    print("summary: mcore / the best peer in tokens/s (target >= 1.15)")
    for shape_name, label, name, ours, best, theirs, ratio in summary:
        verdict = "met" if ratio >= 1.15 else "not met"
        print(f"  {shape_name:>5} {label:>10}: {name} {ours:7.0f} / {best} {theirs:7.0f} = "
              f"{ratio:.3f} ({verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
