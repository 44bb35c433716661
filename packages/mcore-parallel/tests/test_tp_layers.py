"""Tensor-parallel layers on real gloo ranks equal single-process ``nn.Linear`` / ``nn.Embedding``
holding the same global weights: outputs, input gradients and weight gradients, for TP 2 and 4,
with and without sequence parallelism. Global initialisation is the same for every TP size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mcore.core.testing import run_ranks
from mcore.parallel import (
    ColumnParallelLinear,
    ParallelLayoutError,
    ParallelState,
    RowParallelLinear,
    ShardShapeError,
    VocabParallelEmbedding,
)

S, B = 8, 2  # sequence-first activations [s, b, h]
QKV = [8, 4, 4]  # a fused projection: q, k, v blocks each split over TP on their own


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # Not torch.testing.assert_close inside ranks: with torch.distributed initialized it imports
    # torch.distributed.tensor (and sympy), seconds in every forked rank.
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{what}: max abs error {err:.3g}"


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Single-process oracle: output, input grad and parameter grads for upstream ``grad``."""
    x = x.clone().requires_grad_(x.is_floating_point())
    y = module(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _shard_last_dim(t: torch.Tensor, partitions: list[int], tp: int, r: int) -> torch.Tensor:
    """What rank r of a column-parallel layer holds of a full output: its chunk of each block."""
    return torch.cat([blk.chunk(tp, dim=-1)[r] for blk in t.split(partitions, dim=-1)], dim=-1)


def _check_column(rank: int, world_size: int) -> None:
    h, out = 6, sum(QKV)
    weight, bias = _randn(out, h, seed=1), _randn(out, seed=2)
    x_full, grad_full = _randn(S, B, h, seed=3), _randn(S, B, out, seed=4)
    ref = nn.Linear(h, out)
    with torch.no_grad():
        ref.weight.copy_(weight), ref.bias.copy_(bias)
    y_ref, dx_ref, dparams_ref = _reference(ref, x_full, grad_full)

    for tp in (2, 4):
        state = ParallelState(tp=tp)
        group, r = state.tp_group, state.tp_rank
        for sp in (False, True):
            for partitions, gather in ((None, False), (QKV, False), (QKV, True)):
                what = f"tp={tp} sp={sp} partitions={partitions} gather_output={gather}"
                layer = ColumnParallelLinear(
                    h,
                    out,
                    tp_group=group,
                    gather_output=gather,
                    sequence_parallel=sp,
                    partitions=partitions,
                )
                with torch.no_grad():
                    layer.weight.copy_(layer.shard_weight(weight))
                    layer.bias.copy_(layer.shard_bias(bias))
                blocks = partitions or [out]
                x = x_full.chunk(tp)[r] if sp else x_full  # SP input: this rank's sequence chunk
                grad = grad_full if gather else _shard_last_dim(grad_full, blocks, tp, r)
                y, dx, dparams = _reference(layer, x, grad)

                want_y = y_ref if gather else _shard_last_dim(y_ref, blocks, tp, r)
                _assert_close(y, want_y, f"output, {what}")
                _assert_close(dx, dx_ref.chunk(tp)[r] if sp else dx_ref, f"input grad, {what}")
                _assert_close(
                    dparams["weight"], layer.shard_weight(dparams_ref["weight"]), f"dW, {what}"
                )
                _assert_close(dparams["bias"], layer.shard_bias(dparams_ref["bias"]), f"db, {what}")

    # Building checks the sizes (here on TP 4), and sharding the shapes it is given.
    with pytest.raises(ParallelLayoutError, match=r"partition 1 of out_features \(6\) .* \(4\)"):
        ColumnParallelLinear(h, 12, tp_group=state.tp_group, partitions=[4, 6, 2])
    with pytest.raises(ShardShapeError, match=r"expects the full weight of shape \(16, 6\)"):
        layer.shard_weight(torch.zeros(16, 7))


def _check_row(rank: int, world_size: int) -> None:
    h, out = 16, 6
    weight, bias = _randn(out, h, seed=5), _randn(out, seed=6)
    x_full, grad_full = _randn(S, B, h, seed=7), _randn(S, B, out, seed=8)
    ref = nn.Linear(h, out)
    with torch.no_grad():
        ref.weight.copy_(weight), ref.bias.copy_(bias)
    y_ref, dx_ref, dparams_ref = _reference(ref, x_full, grad_full)

    for tp in (2, 4):
        state = ParallelState(tp=tp)
        group, r = state.tp_group, state.tp_rank
        for sp, input_is_parallel in ((False, True), (False, False), (True, True)):
            what = f"tp={tp} sp={sp} input_is_parallel={input_is_parallel}"
            layer = RowParallelLinear(
                h, out, tp_group=group, input_is_parallel=input_is_parallel, sequence_parallel=sp
            )
            with torch.no_grad():
                layer.weight.copy_(layer.shard_weight(weight))
                layer.bias.copy_(layer.shard_bias(bias))
            x = x_full.chunk(tp, dim=-1)[r] if input_is_parallel else x_full
            grad = grad_full.chunk(tp)[r] if sp else grad_full  # SP output: a sequence chunk
            y, dx, dparams = _reference(layer, x, grad)

            _assert_close(y, y_ref.chunk(tp)[r] if sp else y_ref, f"output, {what}")
            want_dx = dx_ref.chunk(tp, dim=-1)[r] if input_is_parallel else dx_ref
            _assert_close(dx, want_dx, f"input grad, {what}")
            _assert_close(dparams["weight"], layer.shard_weight(dparams_ref["weight"]), what)
            if sp:
                # Each rank saw only its sequence chunk; the marked bias is summed over TP by
                # the gradient finalizer, done here by hand.
                assert layer.bias.reduce_grad_over_tp
                dist.all_reduce(dparams["bias"], group=group)
            _assert_close(dparams["bias"], dparams_ref["bias"], f"db, {what}")

    with pytest.raises(ParallelLayoutError, match="needs input_is_parallel=True"):
        RowParallelLinear(h, out, input_is_parallel=False, sequence_parallel=True)


def _check_embedding(rank: int, world_size: int) -> None:
    vocab, h = 16, 6
    table = _randn(vocab, h, seed=9)
    ids = torch.randint(0, vocab, (S, B), generator=torch.Generator().manual_seed(10))
    grad_full = _randn(S, B, h, seed=11)
    ref = nn.Embedding(vocab, h)
    with torch.no_grad():
        ref.weight.copy_(table)
    y_ref, _, dparams_ref = _reference(ref, ids, grad_full)

    # Tied output layer: logits = hidden @ tableᵀ, the table's gradient summed over both uses.
    logits_grad = _randn(S, B, vocab, seed=12)
    ref.weight.grad = None
    hidden = ref(ids)
    logits = nn.functional.linear(hidden, ref.weight)
    ((hidden * grad_full).sum() + (logits * logits_grad).sum()).backward()
    logits_ref, dtable_tied_ref = logits.detach(), ref.weight.grad

    for tp in (2, 4):
        state = ParallelState(tp=tp)
        group, r = state.tp_group, state.tp_rank
        for sp in (False, True):
            what = f"tp={tp} sp={sp}"
            emb = VocabParallelEmbedding(vocab, h, tp_group=group, sequence_parallel=sp)
            assert (emb.vocab_start_index, emb.vocab_end_index) == (
                r * vocab // tp,
                (r + 1) * vocab // tp,
            )
            with torch.no_grad():
                emb.weight.copy_(emb.shard_weight(table))
            grad = grad_full.chunk(tp)[r] if sp else grad_full
            y, _, dparams = _reference(emb, ids, grad)
            _assert_close(y, y_ref.chunk(tp)[r] if sp else y_ref, f"output, {what}")
            _assert_close(dparams["weight"], emb.shard_weight(dparams_ref["weight"]), what)

        # The output layer borrows the embedding's local shard [vocab / tp, h].
        emb = VocabParallelEmbedding(vocab, h, tp_group=group)
        output = ColumnParallelLinear(
            h, vocab, tp_group=group, bias=False, skip_weight_param_allocation=True
        )
        assert output.weight is None
        with torch.no_grad():
            emb.weight.copy_(emb.shard_weight(table))
        hidden = emb(ids)
        logits = output(hidden, weight=emb.weight)
        grad = logits_grad.chunk(tp, dim=-1)[r]
        ((hidden * grad_full).sum() + (logits * grad).sum()).backward()
        _assert_close(logits, logits_ref.chunk(tp, dim=-1)[r], f"tied logits, tp={tp}")
        _assert_close(emb.weight.grad, emb.shard_weight(dtable_tied_ref), f"tied dE, tp={tp}")
        with pytest.raises(ShardShapeError, match="pass the weight to forward"):
            output(hidden)
        with pytest.raises(ShardShapeError, match=r"local shape \(\d+, 6\)"):
            output(hidden, weight=table)


def test_column_parallel_linear_matches_nn_linear() -> None:
    run_ranks(_check_column, 4, backend="gloo")


def test_row_parallel_linear_matches_nn_linear() -> None:
    run_ranks(_check_row, 4, backend="gloo")


def test_vocab_parallel_embedding_and_tied_output_match_nn_embedding() -> None:
    run_ranks(_check_embedding, 4, backend="gloo")


def _build(tp_group, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [
        VocabParallelEmbedding(16, 6, tp_group=tp_group),
        ColumnParallelLinear(6, sum(QKV), tp_group=tp_group, partitions=QKV),
        RowParallelLinear(16, 6, tp_group=tp_group),
        ColumnParallelLinear(6, 16, tp_group=tp_group, init_method=nn.init.xavier_uniform_),
    ]


def _regather(layer: nn.Module, group) -> torch.Tensor:
    """The full weight from every rank's shard (the inverse of ``shard_weight``)."""
    shards = [torch.empty_like(layer.weight) for _ in range(layer.tp_size)]
    dist.all_gather(shards, layer.weight.detach().contiguous(), group=group)
    partitions = getattr(layer, "partitions", None)
    if partitions is None or len(partitions) == 1:
        return torch.cat(shards, dim=layer.partition_dim)
    # Fused blocks: rank r holds [q_r | k_r | v_r]; reassemble [q_0 q_1 .. | k_0 k_1 .. | ..].
    pieces = [s.split(layer.local_partitions, dim=0) for s in shards]
    return torch.cat([torch.cat([p[i] for p in pieces]) for i in range(len(partitions))])


def _global_weights(rank: int, world_size: int) -> dict[int, list[torch.Tensor]]:
    out = {1: [layer.weight.detach() for layer in _build(None, seed=1234)]}
    for tp in (2, 4):
        group = ParallelState(tp=tp).tp_group
        layers = _build(group, seed=1234)
        out[tp] = [_regather(layer, group) for layer in layers]
        assert all(not layer.bias.any() for layer in layers[1:])  # biases start at zero
    return out


def test_global_init_is_the_same_for_every_tp_size() -> None:
    for weights in run_ranks(_global_weights, 4, backend="gloo"):
        for tp in (2, 4):
            for single, regathered in zip(weights[1], weights[tp], strict=True):
                assert torch.equal(single, regathered), tp
    # The default init draws from N(0, 0.02²).
    (embedding, *_) = weights[1]
    assert abs(embedding.std().item() - 0.02) < 0.01


def test_a_meta_device_layer_allocates_shapes_only() -> None:
    layer = ColumnParallelLinear(6, 16, partitions=[8, 8], device="meta")
    assert layer.weight.is_meta and layer.weight.shape == (16, 6)
    state = torch.random.get_rng_state()
    RowParallelLinear(16, 6, device="meta")
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
