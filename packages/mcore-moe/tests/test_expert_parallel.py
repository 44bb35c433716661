"""Expert parallelism on real gloo process groups: every layout equals the single process.

A MoE layer's output and every gradient (router, experts, shared expert) under EP = 2 and 4,
ETP = 2, and TP = 2 with sequence parallelism, for both dispatchers, must equal one process
running the same layer on the same tokens. (Balancing losses are per rank by design, so they
are off here; their tests are in test_routing.py.)
"""

from __future__ import annotations

import pytest
import torch

from mcore.core.testing import run_ranks
from mcore.models import ModelContext, TransformerConfig
from mcore.moe import MoEConfig
from mcore.parallel import ParallelState

HIDDEN, TOKENS_PER_RANK, BATCH = 32, 6, 2


def _config() -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=48, vocab_size=64
    )


def _moe(dispatcher: str, **kw) -> MoEConfig:
    base = dict(
        num_experts=8,
        router_topk=2,
        token_dispatcher_type=dispatcher,
        shared_expert_intermediate_size=16,
        shared_expert_gate=True,
    )
    return MoEConfig(**{**base, **kw})


def _layer(ps: ParallelState, moe: MoEConfig, sequence_parallel: bool = False):
    from mcore.moe.layer import MoELayer

    torch.manual_seed(1234)  # the full weights are drawn, then each rank keeps its share
    ctx = ModelContext(_config(), ps, sequence_parallel, sections={"moe": moe})
    return MoELayer(ctx, layer_number=0)


def _inputs(world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    # [s, b, h]: each rank takes its own rows of s (its own tokens).
    return torch.randn(TOKENS_PER_RANK * world, BATCH, HIDDEN, generator=g)


def _grads(layer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def _run(layer, x: torch.Tensor, weights: torch.Tensor):
    """Forward, then backward of a weighted sum (every output element its own weight)."""
    x = x.clone().requires_grad_(True)
    layer.train()
    out = layer(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def _weights(world: int) -> torch.Tensor:
    return torch.arange(TOKENS_PER_RANK * world * BATCH * HIDDEN).view(-1, BATCH, HIDDEN).sin()


def _reference(world: int, moe: MoEConfig):
    layer = _layer(ParallelState(), moe)
    out, dx = _run(layer, _inputs(world), _weights(world))
    return out, dx, _grads(layer)


def _rank(rank: int, world: int, moe: MoEConfig, layout: dict):
    ps = ParallelState(**layout)
    sp = ps.tp_size > 1
    layer = _layer(ps, moe, sequence_parallel=sp)
    # Rank r owns sequence rows [r*T, (r+1)*T): dense DP ranks and SP shards alike.
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    out, dx = _run(layer, _inputs(world)[rows], _weights(world)[rows])
    grads = _grads(layer)
    # Replicated parameters see only this rank's tokens: sum them as DP/SP reduction would.
    for name, g in grads.items():
        if not getattr(dict(layer.named_parameters())[name], "expert_parallel", False):
            torch.distributed.all_reduce(g)
    return out, dx, grads, ps.ep_rank, ps.etp_rank


LAYOUTS = [
    pytest.param(2, {"ep": 2}, "alltoall", id="ep2-alltoall"),
    pytest.param(2, {"ep": 2}, "allgather", id="ep2-allgather"),
    pytest.param(4, {"ep": 4}, "alltoall", id="ep4-alltoall"),
    pytest.param(4, {"ep": 4}, "allgather", id="ep4-allgather"),
    pytest.param(4, {"ep": 2, "etp": 2}, "alltoall", id="ep2-etp2-alltoall"),
    pytest.param(4, {"ep": 2, "etp": 2}, "allgather", id="ep2-etp2-allgather"),
    pytest.param(2, {"tp": 2, "ep": 2, "etp": 1}, "alltoall", id="tp2-sp-ep2-alltoall"),
]


@pytest.mark.parametrize(("world", "layout", "dispatcher"), LAYOUTS)
def test_expert_parallel_layout_equals_single_process(world, layout, dispatcher) -> None:
    moe = _moe(dispatcher)
    ref_out, ref_dx, ref_grads = _reference(world, moe)
    results = run_ranks(_rank, world, moe, layout)
    nl = moe.num_experts // layout.get("ep", 1)
    etp = layout.get("etp", layout.get("tp", 1))
    for rank, (out, dx, grads, ep_rank, etp_rank) in enumerate(results):
        rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        torch.testing.assert_close(out, ref_out[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx, ref_dx[rows], atol=1e-5, rtol=1e-5)
        for name, g in grads.items():
            want = ref_grads[name]
            if name.startswith("experts."):
                want = want[ep_rank * nl : (ep_rank + 1) * nl]
                if name == "experts.linear_fc1.weight":
                    want = torch.cat([h.chunk(etp, dim=1)[etp_rank] for h in want.chunk(2, 1)], 1)
                else:
                    want = want.chunk(etp, dim=2)[etp_rank]
            elif name.startswith("shared_experts.linear_fc") and layout.get("tp", 1) > 1:
                continue  # TP-split dense MLP: covered by the models' TP tests
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5, msg=name)
