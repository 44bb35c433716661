"""Shared by the tests: a rank launcher, a tiny plain-PyTorch transformer, and the oracle.

megatron-fsdp depends on torch alone, so its tests bring their own launcher instead of
mcore's: ``run_ranks(fn, 4, *args)`` forks four processes joined in a gloo group, runs
``fn(rank, world_size, *args)`` in each, and returns the results by rank.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import megatron_fsdp

VOCAB, HIDDEN, HEADS, FFN, LAYERS = 61, 32, 4, 45, 2  # odd sizes: shards need padding
SEQ, GLOBAL_BATCH = 8, 8


# -- launcher --------------------------------------------------------------------------------


def _rank_main(fn, rank, world_size, store, results, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=120),
        )  # fmt: skip
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks; results by rank."""
    # DTensor's first use imports torch._dynamo (seconds): do it once here, before forking,
    # so that the ranks inherit it instead of each paying again.
    import torch._dynamo  # noqa: F401

    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, os.path.join(tmp, "store"), results, args),
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        try:
            while len(out) < world_size:
                try:
                    rank, ok, value = results.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"ranks did not finish within {timeout}s") from None
                if not ok:
                    raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
                out[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        return [out[r] for r in range(world_size)]


# -- model -----------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _GatherTokens(torch.autograd.Function):
    """All-gather tokens inside the expert-parallel group; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:])
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _ScatterTokens(torch.autograd.Function):
    """Sum expert outputs back to the ranks that own the tokens; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(dist.get_world_size(ctx.group) * grad.shape[0], *grad.shape[1:])
        dist.all_gather_into_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class Experts(nn.Module):
    """This rank's experts, numbered from ``first``; the submodule sharded on the expert mesh."""

    def __init__(self, hidden: int, ffn: int, num_experts: int) -> None:
        super().__init__()
        self.first = 0
        self.mlps = nn.ModuleList(MLP(hidden, ffn) for _ in range(num_experts))

    def forward(self, tokens: torch.Tensor, expert_of: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        for j, mlp in enumerate(self.mlps):
            idx = (expert_of == self.first + j).nonzero().squeeze(1)
            out = out.index_put((idx,), mlp(tokens[idx]))
        return out


class MoE(nn.Module):
    """Fixed routing (token i of a rank goes to expert i % E) so the test has no argmax flips.

    Without an expert-parallel group every expert is local. With one, this rank keeps experts
    ``[ep_rank * E/ep, ...)`` and tokens travel by all-gather / reduce-scatter.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ep_group: dist.ProcessGroup | None = None
        self.experts = Experts(hidden, ffn, num_experts)

    def expert_parallel(self, group: dist.ProcessGroup) -> None:
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        per_rank = self.num_experts // ep
        first = rank * per_rank
        self.experts.mlps = nn.ModuleList(list(self.experts.mlps)[first : first + per_rank])
        self.experts.first = first
        self.ep_group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        n = tokens.shape[0]
        if self.ep_group is not None:
            tokens = _GatherTokens.apply(tokens, self.ep_group)
        expert_of = torch.arange(tokens.shape[0]) % n % self.num_experts
        out = self.experts(tokens, expert_of)
        if self.ep_group is not None:
            out = _ScatterTokens.apply(out, self.ep_group)
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, num_experts: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.mlp = MoE(HIDDEN, 24, num_experts) if num_experts else MLP(HIDDEN, FFN)
        self.gate = nn.Parameter(torch.ones(1))  # one row: most ranks hold an empty shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        return x + self.gate * self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A small decoder in plain PyTorch; ``recompute`` is None, "block" or "stack"."""

    def __init__(self, num_experts: int = 0, recompute: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block(num_experts) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.recompute = recompute

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute == "block" else block(x)
        return x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.recompute == "stack":
            x = checkpoint(self._blocks, x, use_reentrant=False)
        else:
            x = self._blocks(x)
        return self.head(self.norm(x))


def build(seed: int = 0, **kw: Any) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**kw)


def shard(
    model: TinyTransformer, mesh, strategy: str, expert_mesh=None, dp_size: int | None = None, **kw
) -> TinyTransformer:
    """fully_shard every block (experts on ``expert_mesh`` when given) and then the root."""
    for block in model.blocks:
        if expert_mesh is not None:
            megatron_fsdp.fully_shard(
                block.mlp.experts, mesh=expert_mesh, sharding_strategy=strategy,
                gradient_divide_factor=dp_size, **kw,
            )  # fmt: skip
        megatron_fsdp.fully_shard(block, mesh=mesh, sharding_strategy=strategy, **kw)
    megatron_fsdp.fully_shard(model, mesh=mesh, sharding_strategy=strategy, **kw)
    return model


# -- training --------------------------------------------------------------------------------


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the step's global batch (the same global batch at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    # Each next token is a fixed function of the current one, so the loss visibly falls.
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    ids = (start + 7 * torch.arange(SEQ + 1)) % VOCAB
    per = GLOBAL_BATCH // world
    mine = ids[rank * per : (rank + 1) * per]
    return mine[:, :-1], mine[:, 1:]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world: int,
    steps: int,
    *,
    start: int = 0,
    microbatches: int = 1,
    before_step: Callable[[], Any] | None = None,
) -> list[float]:
    """Train ``steps`` steps; returns the global mean loss of each step."""
    losses = []
    for step in range(start, start + steps):
        ids, targets = batch(step, rank, world)
        total = torch.zeros(())
        for i, (x, y) in enumerate(
            zip(ids.chunk(microbatches), targets.chunk(microbatches), strict=True)
        ):
            last = i == microbatches - 1
            sync = contextlib.nullcontext() if last else model.no_sync()
            with sync:
                loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()) / microbatches
                loss.backward()
            total += loss.detach()
        if before_step is not None:
            before_step()
        optimizer.step()
        optimizer.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)


def reference_losses(
    rank: int, world: int, steps: int, clip_norm: float | None = None, **model_kw: Any
) -> list[float]:
    """The oracle: plain data parallelism in fp32, what DDP computes.

    Every rank holds the whole model; after backward each gradient is all-reduced and divided
    by the world size. (torch's DistributedDataParallel computes the same, but constructing it
    imports torch._dynamo, which costs seconds per test process.)
    """
    model = build(**model_kw)
    optimizer = adamw(model)

    def before_step() -> None:
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)

    return train(model, optimizer, rank, world, steps, before_step=before_step)


def expert_parallel_copy(model: TinyTransformer, group: dist.ProcessGroup) -> TinyTransformer:
    """The same weights, with each block's experts split across the expert-parallel group."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.mlp.expert_parallel(group)
    return model
