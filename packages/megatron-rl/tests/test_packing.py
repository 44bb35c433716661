"""Packing: bins, row layout, and packed GRPO steps equal to the unpacked run."""

from __future__ import annotations

import random

import pytest
import torch

from mcore.core import McoreError, get_plugin_manager
from megatron_rl.grpo import GRPOLossConfig
from megatron_rl.packing import TrainSequence, build_rows, micro_batches, pack_bins
from megatron_rl.trainer import GRPOTrainer, make_minibatch, split_over_ranks, with_loss_weights


def test_first_fit_decreasing_bins() -> None:
    assert pack_bins([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]  # 6+2, 5+3, 4
    assert pack_bins([8, 1], 8) == [[0], [1]]
    with pytest.raises(McoreError, match="rollout of 9 tokens does not fit a packing bin of 8"):
        pack_bins([9], 8)
    assert split_over_ranks([5, 3, 4, 2], 2) == [[0, 3], [1, 2]]  # 7 and 7 tokens


def seq(ids: list[int], generated_from: int, advantage: float) -> TrainSequence:
    n = len(ids)
    mask = [i >= generated_from for i in range(n)]
    logprobs = [-0.1 * i if mask[i] else 0.0 for i in range(n)]
    return TrainSequence(ids, mask, logprobs, advantage, [0.5] * n)


def test_rows_shift_every_per_token_value_to_the_predicting_position() -> None:
    a = seq([1, 2, 3, 4], generated_from=2, advantage=1.5)
    b = seq([5, 6, 7], generated_from=1, advantage=-1.0)
    rows = build_rows([a, b], [[0, 1]], row_length=8)
    assert rows["tokens"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert rows["labels"].tolist() == [[2, 3, 4, 0, 6, 7, 0, 0]]
    assert rows["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]  # predicting 3, 4 | 6, 7
    assert rows["rollout_logprobs"][0, [1, 2, 4, 5]].tolist() == pytest.approx(
        [-0.2, -0.3, -0.1, -0.2]
    )
    assert rows["advantages"][0, :6].tolist() == [1.5, 1.5, 1.5, 0, -1.0, -1.0]
    assert rows["weights"].tolist() == [[0, 0.5, 0.5, 0, 0.5, 0.5, 0, 0]]
    assert rows["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]
    assert rows["position_ids"][0, :7].tolist() == [0, 1, 2, 3, 0, 1, 2]
    mbs = micro_batches(rows, rows_per_micro_batch=2, num_micro_batches=2)
    assert [mb["tokens"].shape for mb in mbs] == [torch.Size([2, 8])] * 2
    assert mbs[1]["loss_mask"].sum() == 0 and (mbs[1]["segment_ids"] == -1).all()


def _sequences(n: int, vocab: int, rng: random.Random) -> list[TrainSequence]:
    out = []
    for _ in range(n):
        prompt, completion = rng.randint(2, 5), rng.randint(1, 6)
        ids = [rng.randrange(vocab) for _ in range(prompt + completion)]
        mask = [False] * prompt + [True] * completion
        logprobs = [0.0] * prompt + [-rng.random() for _ in range(completion)]
        out.append(TrainSequence(ids, mask, logprobs, rng.uniform(-1, 1), []))
    return with_loss_weights(out, "seq_mean_token_mean", max_completion_tokens=6)


def _trainer(config, packing: bool):
    manager = get_plugin_manager()
    runtime = manager.hook.mcore_training_runtime(config=config)
    torch.manual_seed(config.train.seed)
    model_config = config.model
    chunks, optimizer, _ = runtime.build(config, model_config, manager.registries)
    loss = GRPOLossConfig(kl_beta=0.05, entropy_coeff=0.01, importance_sampling_correction=True)
    trainer = GRPOTrainer(
        runtime, chunks, optimizer, loss_config=loss, temperature=1.0, vocab_size=7,
        packing=packing,
    )  # fmt: skip
    return trainer, chunks


def test_packed_grpo_step_equals_the_unpacked_step(tiny) -> None:
    config = tiny(
        model__vocab_size=128, optimizer__optimizer="sgd", optimizer__lr=1.0,
        optimizer__weight_decay=0.0, optimizer__clip_grad=0.0, train__micro_batch_size=3,
    )  # fmt: skip
    sequences = _sequences(10, vocab=7, rng=random.Random(0))
    results = {}
    for packing in (True, False):
        trainer, chunks = _trainer(config, packing)
        batch = make_minibatch(
            sequences, dp_rank=0, dp_size=1, rows_per_micro_batch=3, bin_size=24, packing=packing
        )
        # pi_old and pi_ref from forward-only passes (here: the same weights, perturbed for
        # the reference so the KL is not 0), stored per micro-batch.
        trainer.compute_logprobs(chunks, batch, "old_logprobs")
        for mb in batch.micro_batches:
            mb["ref_logprobs"] = mb["old_logprobs"] - 0.1 * mb["loss_mask"]
        per_token = {}
        for mb in batch.micro_batches:
            for r, c in (mb["loss_mask"] > 0).nonzero().tolist():
                per_token[(int(mb["seq_index"][r, c]), int(mb["position_ids"][r, c]))] = float(
                    mb["old_logprobs"][r, c]
                )
        sums, grad_norm, _ = trainer.train_step(batch)
        params = {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items()}
        results[packing] = (len(batch.micro_batches), per_token, sums, grad_norm, params)
    packed, unpacked = results[True], results[False]
    assert packed[0] < unpacked[0]  # fewer rows: that is the point
    assert packed[1].keys() == unpacked[1].keys()
    for key, value in packed[1].items():
        assert value == pytest.approx(unpacked[1][key], abs=1e-5)
    for name in ("loss", "tokens", "entropy", "kl", "is_weight", "truncated"):
        assert packed[2][name] == pytest.approx(unpacked[2][name], rel=1e-5, abs=1e-6), name
    assert packed[2]["tokens"] == sum(s.loss_mask[1:].count(True) for s in sequences)
    assert packed[3] == pytest.approx(unpacked[3], rel=1e-5)
    assert packed[3] > 0
    for name, value in packed[4].items():  # SGD, lr 1: equal weights mean equal gradients
        torch.testing.assert_close(value, unpacked[4][name], rtol=1e-5, atol=1e-6)
