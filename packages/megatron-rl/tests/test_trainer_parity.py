"""One GRPO step in a parallel layout equals the single-process step: the loss scaling over
micro-batches and data-parallel replicas, and the logits of tensor-parallel and pipeline
stages, give the very gradient of the step's loss."""

from __future__ import annotations

import random

import pytest
import torch

from mcore.core import get_plugin_manager, load_config
from mcore.core.testing import run_ranks
from megatron_rl.grpo import GRPOLossConfig
from megatron_rl.packing import TrainSequence
from megatron_rl.refit import gather_full_state_dict
from megatron_rl.trainer import GRPOTrainer, make_minibatch, with_loss_weights

LAYOUTS = {"single": {}, "dp2": {}, "tp2": {"parallel.tp": "2"}, "pp2": {"parallel.pp": "2"}}


def _sequences() -> list[TrainSequence]:
    rng = random.Random(0)
    out = []
    for _ in range(12):
        prompt, completion = rng.randint(2, 5), rng.randint(1, 6)
        ids = [rng.randrange(7) for _ in range(prompt + completion)]
        logprobs = [0.0] * prompt + [-rng.random() for _ in range(completion)]
        out.append(
            TrainSequence(
                ids, [False] * prompt + [True] * completion, logprobs, rng.uniform(-1, 1), []
            )
        )
    return with_loss_weights(out, "token_mean", max_completion_tokens=6)


def _step(rank: int, world_size: int, overrides: dict[str, str]) -> dict:
    config = load_config(overrides=overrides)
    manager = get_plugin_manager()
    runtime = manager.hook.mcore_training_runtime(config=config)
    torch.manual_seed(config.train.seed)
    chunks, optimizer, _ = runtime.build(config, config.model, manager.registries)
    ps = runtime.parallel_state
    loss = GRPOLossConfig(kl_beta=0.1, entropy_coeff=0.01, importance_sampling_correction=True)
    trainer = GRPOTrainer(
        runtime, chunks, optimizer, loss_config=loss, temperature=1.0, vocab_size=7, packing=True
    )
    batch = make_minibatch(
        _sequences(), dp_rank=ps.dp_rank, dp_size=ps.dp_size, rows_per_micro_batch=2,
        bin_size=16, packing=True,
    )  # fmt: skip
    trainer.compute_logprobs(chunks, batch, "ref_logprobs")
    for mb in batch.micro_batches:
        if "ref_logprobs" in mb:
            mb["ref_logprobs"] -= 0.2 * mb["loss_mask"]
    sums, grad_norm, _ = trainer.train_step(batch)
    return {"sums": sums, "grad_norm": grad_norm, "weights": gather_full_state_dict(chunks)}


@pytest.fixture(scope="module")
def results(tiny_overrides) -> dict[str, dict]:
    base = {
        **tiny_overrides, "model.vocab-size": "128", "optimizer.optimizer": "sgd",
        "optimizer.lr": "1.0", "optimizer.weight-decay": "0", "optimizer.clip-grad": "0",
    }  # fmt: skip
    out = {"single": _step(0, 1, base)}
    for name in ("dp2", "tp2", "pp2"):
        out[name] = run_ranks(_step, 2, {**base, **LAYOUTS[name]}, backend="gloo")[0]
    return out


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2"])
def test_a_grpo_step_equals_the_single_process_step(results, layout) -> None:
    single, parallel = results["single"], results[layout]
    for key in ("loss", "tokens", "entropy", "kl", "is_weight"):
        assert parallel["sums"][key] == pytest.approx(single["sums"][key], rel=1e-5), key
    assert parallel["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    for name, value in single["weights"].items():  # SGD with lr 1: equal gradients
        torch.testing.assert_close(parallel["weights"][name], value, rtol=1e-4, atol=1e-6)
