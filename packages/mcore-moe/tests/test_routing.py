"""Routing: the top-k router's variants against hand-written references, capacity, padding
for quantised GEMMs, the balancing losses, the aux-loss-free bias and router replay."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mcore.core.testing import run_ranks
from mcore.models import GPTModel, ModelContext, TransformerConfig
from mcore.moe import MoEConfig
from mcore.moe.routing import (
    apply_capacity,
    load_balancing_loss,
    pad_for_quantization,
    routing_map_from_topk,
    z_loss,
)
from mcore.parallel import ParallelState

HIDDEN = 16


def _logits(tokens: int = 10, experts: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


def _route(logits, **kw):
    from mcore.moe.router import topk_routing

    bias = kw.pop("bias", None)
    return topk_routing(logits, MoEConfig(num_experts=logits.shape[1], **kw), bias)


def test_softmax_topk_renormalises_over_the_chosen_experts() -> None:
    logits = _logits()
    out = _route(logits, router_topk=2)
    top = logits.topk(2, dim=-1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.probs, torch.softmax(top.values, dim=-1))


def test_pre_softmax_keeps_full_softmax_probabilities_unless_normalised() -> None:
    logits = _logits()
    full = torch.softmax(logits, dim=-1)
    out = _route(logits, router_topk=3, router_pre_softmax=True)
    torch.testing.assert_close(out.probs, full.topk(3, dim=-1).values)
    normed = _route(logits, router_topk=3, router_pre_softmax=True, router_norm_topk_prob=True)
    torch.testing.assert_close(normed.probs.sum(-1), torch.ones(logits.shape[0]))


def _deepseek_reference(logits, bias, *, groups, group_topk, topk, scale):
    """DeepSeek-V3's routing, token by token, written plainly."""
    probs, indices = [], []
    for row in logits:
        s = torch.sigmoid(row)
        choice = s + bias
        per_group = choice.view(groups, -1)
        strength = torch.stack([g.topk(2).values.sum() for g in per_group])
        keep_groups = strength.topk(group_topk).indices.tolist()
        allowed = [e for e in range(len(row)) if e // per_group.shape[1] in keep_groups]
        best = sorted(allowed, key=lambda e: -float(choice[e]))[:topk]
        w = s[best] / s[best].sum()
        probs.append(w * scale)
        indices.append(torch.tensor(best))
    return torch.stack(probs), torch.stack(indices)


def test_grouped_sigmoid_routing_with_bias_matches_deepseek_v3() -> None:
    logits = _logits(tokens=12, experts=8, seed=3)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(4)) * 0.5
    kw = dict(groups=4, group_topk=2, topk=3, scale=2.5)
    ref_probs, ref_idx = _deepseek_reference(logits, bias, **kw)
    out = _route(
        logits,
        bias=bias,
        router_topk=3,
        router_score_function="sigmoid",
        router_num_groups=4,
        router_group_topk=2,
        router_norm_topk_prob=True,
        router_topk_scaling_factor=2.5,
    )
    order = out.indices.argsort(dim=-1)  # compare as sets per token
    assert torch.equal(out.indices.gather(1, order), ref_idx.sort(dim=-1).values)
    ref_order = ref_idx.argsort(dim=-1)
    torch.testing.assert_close(out.probs.gather(1, order), ref_probs.gather(1, ref_order))
    # The bias changes which experts are chosen, never their weights: unbiased sigmoid scores.
    s = torch.sigmoid(logits).gather(1, out.indices)
    torch.testing.assert_close(out.probs, 2.5 * s / s.sum(-1, keepdim=True))


def test_capacity_drops_lowest_probability_or_latest_tokens() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    routing_map = torch.ones_like(probs, dtype=torch.bool)
    kept_probs, kept = apply_capacity(probs, routing_map, 2, policy="probs")
    assert kept[:, 0].tolist() == [True, False, True, False]  # 0.9 and 0.7 stay
    assert kept[:, 1].tolist() == [False, True, False, True]  # 0.8 and 0.4 stay
    assert torch.equal(kept_probs, probs * kept)
    _, by_position = apply_capacity(probs, routing_map, 2, policy="position")
    assert by_position[:, 0].tolist() == [True, True, False, False]


def test_pad_to_capacity_gives_every_expert_exactly_its_capacity() -> None:
    logits = _logits(tokens=16, experts=4)
    out = _route(logits, router_topk=1)
    probs, routing_map = routing_map_from_topk(out.probs, out.indices, 4)
    for policy in ("probs", "position"):
        padded_probs, padded = apply_capacity(
            probs, routing_map, 5, policy=policy, pad_to_capacity=True
        )
        assert padded.sum(dim=0).tolist() == [5, 5, 5, 5]
        assert torch.all(padded_probs[padded & ~routing_map] == 0)


def test_quantization_padding_rounds_each_expert_up_to_the_alignment() -> None:
    logits = _logits(tokens=100, experts=4)
    out = _route(logits, router_topk=2)
    probs, routing_map = routing_map_from_topk(out.probs, out.indices, 4)
    _, padded = pad_for_quantization(probs, routing_map, 16)
    assert all(c % 16 == 0 for c in padded.sum(dim=0).tolist())
    assert torch.all(padded[routing_map])  # every real route is kept


def test_quantization_padding_leaves_the_layer_output_unchanged() -> None:
    x = torch.randn(24, 2, HIDDEN, generator=torch.Generator().manual_seed(0))
    outs = []
    for pad in (False, True):
        layer = _layer(MoEConfig(num_experts=4, router_topk=2, router_padding_for_quantization=pad))
        outs.append(layer(x))
        if pad:
            counts = layer._tokens_per_expert
            assert all(c % 16 == 0 or c == 48 for c in counts.tolist())
    torch.testing.assert_close(outs[0], outs[1])


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not() -> None:
    balanced_scores = torch.full((8, 4), 0.25)
    idx = torch.arange(8).remainder(4).unsqueeze(1)
    _, balanced_map = routing_map_from_topk(torch.ones(8, 1), idx, 4)
    assert float(load_balancing_loss(balanced_scores, balanced_map, 1)) == pytest.approx(1.0)
    skewed_scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, 4)
    _, skewed_map = routing_map_from_topk(torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.long), 4)
    # f = [1, 0, 0, 0], P = [0.7, ...]: E * 1 * 0.7
    assert float(load_balancing_loss(skewed_scores, skewed_map, 1)) == pytest.approx(4 * 0.7)


def test_sequence_level_loss_averages_per_sequence_losses() -> None:
    scores = torch.softmax(_logits(tokens=12, experts=4), dim=-1)
    idx = scores.topk(2, dim=-1).indices
    _, routing_map = routing_map_from_topk(torch.ones(12, 2), idx, 4)
    # tokens are [seq=4, batch=3] flattened: sequence b is rows b, b+3, b+6, b+9
    per_seq = [load_balancing_loss(scores[b::3], routing_map[b::3], 2) for b in range(3)]
    got = load_balancing_loss(scores, routing_map, 2, num_sequences=3, per_sequence=True)
    torch.testing.assert_close(got, torch.stack(per_seq).mean())


def test_z_loss_is_the_mean_squared_log_partition() -> None:
    logits = _logits()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist())
    assert float(z_loss(logits)) == pytest.approx(expected / logits.shape[0], rel=1e-5)


def _global_aux(rank: int, world: int) -> float:
    from mcore.moe.routing import global_token_counts

    ps = ParallelState()
    logits = _logits(tokens=16, experts=4, seed=5)
    scores = torch.softmax(logits, dim=-1)
    _, routing_map = routing_map_from_topk(torch.ones(16, 2), scores.topk(2).indices, 4)
    rows = slice(rank * 8, (rank + 1) * 8)
    counts, n = global_token_counts(routing_map[rows], [torch.distributed.group.WORLD])
    del ps
    lb = load_balancing_loss(
        scores[rows], routing_map[rows], 2, token_counts=counts, total_tokens=n
    )
    return float(lb)


def test_global_batch_loss_uses_the_expert_load_of_every_rank() -> None:
    logits = _logits(tokens=16, experts=4, seed=5)
    scores = torch.softmax(logits, dim=-1)
    _, routing_map = routing_map_from_topk(torch.ones(16, 2), scores.topk(2).indices, 4)
    whole = float(load_balancing_loss(scores, routing_map, 2))
    per_rank = run_ranks(_global_aux, 2)
    # Each rank's loss uses global counts and its own mean scores: their mean is the whole's.
    assert sum(per_rank) / 2 == pytest.approx(whole, rel=1e-6)


# --- the layer ---------------------------------------------------------------------------------


def _config(**kw) -> TransformerConfig:
    base = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, vocab_size=32
    )
    return TransformerConfig(**{**base, **kw})


def _layer(moe: MoEConfig, **config):
    from mcore.moe.layer import MoELayer

    torch.manual_seed(0)
    return MoELayer(ModelContext(_config(**config), ParallelState(), sections={"moe": moe}))


@pytest.mark.parametrize("activation", ["swiglu", "squared_relu", "gelu"])
@pytest.mark.parametrize("grouped", [True, False])
def test_layer_matches_a_token_by_token_reference(activation, grouped) -> None:
    moe = MoEConfig(num_experts=4, router_topk=2, grouped_gemm=grouped)
    layer = _layer(moe, activation=activation)
    x = torch.randn(5, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    w1, w2 = layer.experts.linear_fc1.weight, layer.experts.linear_fc2.weight
    act = {
        "swiglu": lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
        "squared_relu": lambda h: F.relu(h).square(),
        "gelu": F.gelu,
    }[activation]
    tokens = x.reshape(-1, HIDDEN)
    routed = layer.router(tokens)
    expected = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for p, e in zip(routed.probs[t], routed.indices[t], strict=True):
            expected[t] += p * (act(tokens[t] @ w1[e].T) @ w2[e].T)
    torch.testing.assert_close(out.reshape(-1, HIDDEN), expected, atol=1e-5, rtol=1e-5)


def test_grouped_gemm_pads_sizes_that_are_not_16_byte_aligned() -> None:
    moe = MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=13)
    x = torch.randn(6, 2, 18, generator=torch.Generator().manual_seed(2))
    outs = []
    for grouped in (True, False):
        moe.grouped_gemm = grouped
        layer = _layer(moe, hidden_size=18)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, layer.experts.linear_fc1.weight.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_aux_loss_free_bias_moves_the_load_toward_balance() -> None:
    """Skew the router toward two experts; with the bias update the load evens out, without it
    the imbalance stays."""
    x = torch.randn(64, 2, HIDDEN, generator=torch.Generator().manual_seed(3))
    imbalance = {}
    for enabled in (False, True):
        moe = MoEConfig(
            num_experts=8,
            router_topk=2,
            router_score_function="sigmoid",
            router_norm_topk_prob=True,
            router_enable_expert_bias=enabled,
            # Small against the router logits this tiny layer draws, so the sign update settles
            # instead of overshooting back and forth.
            router_bias_update_rate=0.005,
        )
        layer = _layer(moe)
        with torch.no_grad():
            layer.router.weight[:2] += 0.5 * x.reshape(-1, HIDDEN).mean(0)  # favour 0 and 1
        layer.train()
        history = []
        for _ in range(60):
            with torch.no_grad():
                layer(x)
            layer.finalize_step()
            total, count = layer.read_statistics()["moe/expert_load_imbalance"]
            history.append(float(total) / count)
        imbalance[enabled] = (history[0], history[-1])
    start, end = imbalance[True]
    assert start > 1.5  # max/mean load: 1 is perfect balance
    assert end - 1 < 0.5 * (start - 1), imbalance
    assert imbalance[False][1] == pytest.approx(imbalance[False][0])
    assert end < 1.5  # max load within 1.5x of the mean


def test_router_replay_reproduces_outputs_and_choices_exactly() -> None:
    from mcore.moe import RouterReplay

    cfg = _config(num_layers=2, vocab_size=64)
    moe = MoEConfig(num_experts=4, router_topk=2)
    torch.manual_seed(0)
    model = GPTModel(cfg, sections={"moe": moe})
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    replay = RouterReplay(model)
    chosen: list[torch.Tensor] = []
    hook = model.layers["0"].mlp.router.register_forward_hook(
        lambda _m, _i, out: chosen.append(out.indices.clone())
    )
    with replay.record():
        recorded = model(ids)
    with replay.replay():
        replayed = model(ids)
    assert torch.equal(recorded, replayed)  # bit-exact
    with torch.no_grad():  # new router weights would route differently...
        for layer in model.layers.values():
            layer.mlp.router.weight.add_(torch.randn_like(layer.mlp.router.weight))
    model(ids)
    assert not torch.equal(chosen[-1], chosen[0])
    with replay.replay():  # ...but replay picks the recorded experts
        model(ids)
    assert torch.equal(chosen[-1], chosen[0])
    hook.remove()
    with replay.replay():
        model(ids)
        with pytest.raises(RuntimeError, match="recorded 1 time"):
            model(ids)


def test_hybrid_pattern_places_moe_layers_by_symbol() -> None:
    from mcore.moe.layer import MoELayer

    cfg = _config(num_layers=4, vocab_size=64, hybrid_override_pattern="*E*-")
    model = GPTModel(cfg, sections={"moe": MoEConfig(num_experts=4, router_topk=2)})
    kinds = [
        (layer.self_attention is not None, type(layer.mlp).__name__ if layer.mlp else None)
        for layer in model.layers.values()
    ]
    assert kinds == [(True, None), (False, "MoELayer"), (True, None), (False, "MLP")]
    assert isinstance(model.layers["1"].mlp, MoELayer)
    logits = model(torch.randint(0, 64, (2, 8)))
    assert logits.shape == (2, 8, 64)


def test_first_dense_layers_and_layer_frequency() -> None:
    moe = MoEConfig(num_experts=4, router_topk=2, first_k_dense=1, layer_freq=2)
    model = GPTModel(_config(num_layers=5, vocab_size=64), sections={"moe": moe})
    names = [type(layer.mlp).__name__ for layer in model.layers.values()]
    assert names == ["MLP", "MoELayer", "MLP", "MoELayer", "MLP"]


def test_moe_under_tensor_parallelism_needs_sequence_parallelism_to_train() -> None:
    from mcore.moe.layer import MoELayer

    ps = ParallelState()
    ps.tp_size = 2  # only the check is exercised; no process group is needed
    ctx = ModelContext(_config(), ps, sections={"moe": MoEConfig(num_experts=4)})
    layer = MoELayer(ctx).train()  # it builds: serving routes each TP rank's share of tokens
    with pytest.raises(ValueError, match="sequence_parallel = true\\) to train"):
        layer(torch.randn(4, 1, ctx.config.hidden_size))


def test_a_model_without_the_moe_section_says_what_is_missing() -> None:
    from mcore.moe.layer import MoELayer

    with pytest.raises(ValueError, match=r"needs the \[moe\] config section"):
        MoELayer(ModelContext(_config(), ParallelState()))
