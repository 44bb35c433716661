"""The fused router (one pure function, one ``train.compile`` region), the gathers-only
permutation the all-to-all dispatcher takes for plain top-k routing, and the SwiGLU experts'
backward: each against the unfused computation it replaces."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mcore.models import GPTModel, ModelContext, TransformerConfig
from mcore.moe import MoEConfig
from mcore.moe.router import fused_topk_routing, topk_routing
from mcore.moe.routing import routing_map_from_topk
from mcore.parallel import ParallelState
from mcore.parallel.compile import compile_regions

HIDDEN = 16

ROUTINGS = {
    "softmax": dict(router_topk=2),
    "pre_softmax_normalised": dict(
        router_topk=3, router_pre_softmax=True, router_norm_topk_prob=True
    ),
    "deepseek_v3": dict(
        router_topk=2,
        router_score_function="sigmoid",
        router_norm_topk_prob=True,
        router_num_groups=4,
        router_group_topk=2,
        router_topk_scaling_factor=2.5,
    ),
}


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("replay", [False, True])
def test_fused_routing_is_topk_routing_with_its_routing_map_and_counts(name, replay) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 8, generator=gen, requires_grad=True)
    moe = MoEConfig(num_experts=8, **ROUTINGS[name])
    bias = torch.randn(8, generator=gen) if moe.router_score_function == "sigmoid" else None
    indices = torch.randn(12, 8, generator=gen).topk(moe.router_topk).indices if replay else None

    probs, chosen, scores, dense, routing_map, counts = fused_topk_routing(
        logits, moe, bias, indices
    )
    want = topk_routing(logits, moe, bias, indices)
    want_dense, want_map = routing_map_from_topk(want.probs, want.indices, 8)
    assert torch.equal(chosen, want.indices) and torch.equal(probs, want.probs)
    assert torch.equal(scores, want.scores) and torch.equal(dense, want_dense)
    assert torch.equal(routing_map, want_map)
    assert counts.dtype == torch.int64 and torch.equal(counts, want_map.sum(dim=0))
    # The dense probabilities carry the gradient to the logits as the unfused path does.
    (grad,) = torch.autograd.grad((dense * torch.arange(8.0)).sum(), logits)
    (want_grad,) = torch.autograd.grad((want_dense * torch.arange(8.0)).sum(), logits)
    assert torch.equal(grad, want_grad)


def _config(**kw) -> TransformerConfig:
    base = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, vocab_size=32
    )
    return TransformerConfig(**{**base, **kw})


def _layer(moe: MoEConfig):
    from mcore.moe.layer import MoELayer

    torch.manual_seed(0)
    return MoELayer(ModelContext(_config(), ParallelState(), sections={"moe": moe}))


def _step(module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output and the input's and every parameter's gradient of one forward and backward."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.square().sum().backward()
    grads = [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return grads


def test_the_router_is_a_region_train_compile_auto_leaves_eager_on_cpu() -> None:
    layer = _layer(MoEConfig(num_experts=4, router_topk=2))
    assert type(layer.router.routing).compile_region
    assert compile_regions([layer], "auto", "inductor", torch.device("cpu")) == 0
    assert compile_regions([layer], "off", "inductor", torch.device("cpu")) == 0
    assert layer.router.routing._compiled_call_impl is None


def test_a_compiled_router_region_gives_the_eager_layer(caplog) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    moe = MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    layer = _layer(moe).train()
    x = torch.randn(6, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    eager = _step(layer, x)
    with caplog.at_level(logging.WARNING, logger="mcore.parallel.compile"):
        assert compile_regions([layer], "on", "aot_eager", torch.device("cpu")) == 1
        compiled = _step(layer, x)
    assert layer.router.routing._compiled_call_impl is not None  # still compiled: no fallback
    assert "compiling failed" not in caplog.text
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_router_regions_compile_inside_compiled_layers(caplog) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTModel(_config(), sections={"moe": MoEConfig(num_experts=4, router_topk=2)})
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(2))

    def step() -> list[torch.Tensor]:
        loss = model(ids, labels=ids).mean()
        loss.backward()
        out = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    eager = step()
    with caplog.at_level(logging.WARNING, logger="mcore.parallel.compile"):
        # Two transformer layers and their two routers.
        assert compile_regions([model], "on", "aot_eager", torch.device("cpu")) == 4
        compiled = step()
    assert "compiling failed" not in caplog.text
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_plain_topk_routing_is_dispatched_by_gathers_with_the_same_gradients(monkeypatch) -> None:
    from mcore.moe.dispatcher import alltoall

    x = torch.randn(7, 2, HIDDEN, generator=torch.Generator().manual_seed(3))
    layer = _layer(MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=1e-2)).train()
    gathers = _step(layer, x)
    assert layer.dispatcher._topk == 2
    split_sizes = alltoall._split_sizes
    monkeypatch.setattr(alltoall, "_split_sizes", lambda m: (split_sizes(m)[0], None))
    scatters = _step(layer, x)
    assert layer.dispatcher._topk is None
    for got, want in zip(gathers, scatters, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dropped_tokens_take_the_general_permutation() -> None:
    moe = MoEConfig(num_experts=4, router_topk=2, expert_capacity_factor=0.5)
    layer = _layer(moe).train()
    layer(torch.randn(8, 2, HIDDEN))
    assert layer.dispatcher._topk is None  # some tokens kept fewer than two experts
    layer.eval()
    layer.set_inference_mode(True)  # serving drops nothing
    with torch.no_grad():
        layer(torch.randn(8, 2, HIDDEN))
    assert layer.dispatcher._topk == 2


def test_swiglu_backward_is_autograds_bit_for_bit() -> None:
    from mcore.moe.experts import swiglu

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(9, 10, generator=gen, requires_grad=True)
    grad = torch.randn(9, 5, generator=gen)
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up
    (want_grad,) = torch.autograd.grad(want, h, grad)
    got = swiglu(h)
    (got_grad,) = torch.autograd.grad(got, h, grad)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
