"""GPTModel split into pipeline stages equals the whole model on one process: the same weights
from the same seed, and the same losses and gradients after one forward-backward over four
micro-batches, for 1F1B, interleaved virtual stages and TP x PP, with tied and untied
embeddings."""

from __future__ import annotations

import pytest
import torch

from mcore.core.testing import run_ranks
from mcore.models import GPTModel
from mcore.parallel import (
    ParallelLayoutError,
    ParallelState,
    allreduce_embedding_grads,
    get_forward_backward_func,
)

B, S, M = 2, 16, 4  # micro-batch size, sequence length, micro-batches


def microbatches(vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, vocab_size, (B, S), generator=g),
            torch.randint(0, vocab_size, (B, S), generator=g),
        )
        for _ in range(M)
    ]


def forward_step(data_iterator, model):
    """Megatron-style: every stage reads the micro-batch (positions on all, labels on the last)."""
    input_ids, labels = next(data_iterator)
    output = model(input_ids, labels=labels)  # per-token loss on the last stage, else hidden

    def loss_func(per_token_loss):
        loss = per_token_loss.mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def reference(config):
    """The whole model on one process: weights, per-micro-batch losses, gradients."""
    torch.manual_seed(0)
    model = GPTModel(config)
    losses = []
    for input_ids, labels in microbatches(config.vocab_size):
        loss = model(input_ids, labels=labels).mean()
        (loss / M).backward()
        losses.append(loss.detach())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    return weights, losses, grads


def expected_local(model: GPTModel, name: str, full: dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's part of the single-process tensor behind parameter ``name``."""
    source = name
    if name == "output_layer.weight" and model.tied_embeddings:
        source = "embedding.weight"  # the last stage's copy of the tied embeddings
    owner, attr = name.rsplit(".", 1)
    shard = getattr(model.get_submodule(owner), f"shard_{attr}", None)
    return shard(full[source]) if shard is not None else full[source]


def _stage_rank(rank, world, config, tp, vp, sp, forward_only, ref_weights, ref_grads):
    torch.manual_seed(0)
    ps = ParallelState(tp=tp, pp=world // tp)
    chunks = [GPTModel(config, ps, sequence_parallel=sp, vp_stage=c, vp_size=vp) for c in range(vp)]
    weight_mismatches = [
        f"{c}:{name}"
        for c, chunk in enumerate(chunks)
        for name, p in chunk.named_parameters()
        if not torch.equal(p, expected_local(chunk, name, ref_weights))
    ]
    data = microbatches(config.vocab_size)
    metrics = get_forward_backward_func(ps, vp_size=vp)(
        forward_step_func=forward_step,
        data_iterator=[iter(data) for _ in chunks],
        model=chunks,
        num_microbatches=M,
        seq_length=S,
        micro_batch_size=B,
        forward_only=forward_only,
    )
    grad_mismatches = []
    if forward_only:
        grad_mismatches = [n for c in chunks for n, p in c.named_parameters() if p.grad is not None]
    else:
        for chunk in chunks:
            chunk.reduce_partial_grads()  # norms under sequence parallelism
        allreduce_embedding_grads(chunks, ps)
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                want = expected_local(chunk, name, ref_grads)
                if not torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6):
                    grad_mismatches.append((name, (p.grad - want).abs().max().item()))
    layers = [sorted(chunk.layers, key=int) for chunk in chunks]
    return [m["lm loss"] for m in metrics], layers, weight_mismatches, grad_mismatches


LAYOUTS = {
    # name: (world size, tp, virtual chunks, sequence parallel)
    "pp2_1f1b": (2, 1, 1, False),
    "pp4_1f1b": (4, 1, 1, False),
    "pp2_interleaved_vp2": (2, 1, 2, False),
    "tp2_pp2_sp": (4, 2, 1, True),
}
LAYERS_HELD = {  # global layer names per stage (rank order), per chunk
    "pp2_1f1b": [[["0", "1"]], [["2", "3"]]],
    "pp4_1f1b": [[["0"]], [["1"]], [["2"]], [["3"]]],
    "pp2_interleaved_vp2": [[["0"], ["2"]], [["1"], ["3"]]],
    "tp2_pp2_sp": [[["0", "1"]], [["0", "1"]], [["2", "3"]], [["2", "3"]]],
}


def check_layout(config, layout: str) -> None:
    world, tp, vp, sp = LAYOUTS[layout]
    weights, losses, grads = reference(config)
    results = run_ranks(
        _stage_rank, world, config, tp, vp, sp, False, weights, grads, backend="gloo"
    )
    last_stage_ranks = range(world - tp, world)
    for rank, (rank_losses, layers, weight_mismatches, grad_mismatches) in enumerate(results):
        assert layers == LAYERS_HELD[layout][rank]
        assert weight_mismatches == []
        assert grad_mismatches == []
        if rank in last_stage_ranks:
            torch.testing.assert_close(rank_losses, losses, rtol=1e-5, atol=1e-6)
        else:
            assert rank_losses == []


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_stages_equal_one_process(layout, tied, tiny) -> None:
    check_layout(tiny(num_layers=4, untie_embeddings_and_output_weights=not tied), layout)


def test_learned_positions_live_on_the_first_stage(tiny) -> None:
    config = tiny(
        num_layers=4,
        normalization="LayerNorm",
        activation="gelu",
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
    )
    check_layout(config, "pp2_1f1b")


def test_forward_only_returns_losses_without_gradients(tiny) -> None:
    config = tiny(num_layers=4)
    weights, losses, grads = reference(config)
    results = run_ranks(_stage_rank, 2, config, 1, 1, False, True, weights, grads, backend="gloo")
    torch.testing.assert_close(results[-1][0], losses, rtol=1e-5, atol=1e-6)
    assert [r[3] for r in results] == [[], []]  # no parameter has a gradient


def _uneven_rank(rank, world, config):
    ps = ParallelState(pp=world)
    with pytest.raises(ParallelLayoutError, match=r"num_layers \(3\) is not divisible"):
        GPTModel(config, ps)
    with pytest.raises(ParallelLayoutError, match=r"\(2\) \S+ virtual_pipeline_model_parallel"):
        GPTModel(config, ps, vp_stage=0, vp_size=2)


def test_layers_that_do_not_split_evenly_fail_at_construction(tiny) -> None:
    run_ranks(_uneven_rank, 2, tiny(num_layers=3), backend="gloo")


def test_virtual_stages_need_a_pipeline(tiny) -> None:
    with pytest.raises(ParallelLayoutError, match="pipeline_model_parallel_size > 1"):
        GPTModel(tiny(), vp_stage=0, vp_size=2)
    with pytest.raises(ParallelLayoutError, match="pass vp_size"):
        GPTModel(tiny(), vp_stage=1)


def same_weights(a: GPTModel, b: GPTModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_one_stage_model_is_unchanged_and_seeded_per_component(tiny) -> None:
    model = GPTModel(tiny(), init_seed=5)
    assert model.pre_process and model.post_process
    assert "output_layer.weight" not in model.state_dict()  # tied: one table
    again = GPTModel(tiny(), init_seed=5)
    assert same_weights(model, again)
    torch.manual_seed(0)
    first = GPTModel(tiny())
    second = GPTModel(tiny())  # the seed is peeked, not drawn: the same model again
    assert same_weights(first, second)
    torch.manual_seed(1)
    other = GPTModel(tiny())
    assert not torch.equal(other.embedding.weight, first.embedding.weight)
