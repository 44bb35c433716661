"""``mcore train`` with ``--train.data-parallel megatron_fsdp`` follows DDP's loss curve.

For a dense GPT on 2 and 4 gloo ranks and a MoE GPT with expert parallelism 2, each sharding
strategy (and hybrid sharding over two replicas) trains 20 steps whose losses and gradient
norms equal plain DDP in fp32 on the same data. Each case runs every variant in the same ranks,
one ``train()`` after another, so the process start-up is paid once.
"""

from __future__ import annotations

import pytest

from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

STEPS = 20
STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
FSDP = {"train.data-parallel": "megatron_fsdp"}
MOE = {
    "moe.num-experts": "4",
    "moe.router-topk": "2",
    "moe.ffn-hidden-size": "32",
    "moe.aux-loss-coeff": "0.01",
    "moe.shared-expert-intermediate-size": "16",
}


def config(cache_dir: str, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "8",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "model.ffn-hidden-size": "64",
        "optimizer.lr": "2e-3",
        "optimizer.lr-warmup-iters": "2",
        "optimizer.clip-grad": "1.0",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


def _variants(base: dict[str, str], hybrid: bool) -> dict[str, dict[str, str]]:
    variants = {"ddp": base}
    for strategy in STRATEGIES:
        variants[strategy] = {
            **base,
            **FSDP,
            "fsdp.data-parallel-sharding-strategy": strategy,
        }
    if hybrid:
        variants["hybrid"] = {**base, **FSDP, "fsdp.num-distributed-optimizer-instances": "2"}
    return variants


def _train_all(rank: int, world: int, cache: str, variants: dict) -> dict:
    out = {}
    for name, overrides in variants.items():
        result = train(config(cache, **overrides))
        out[name] = (result.losses, result.grad_norms)
    return out


def _check(curves: dict) -> None:
    losses, norms = curves.pop("ddp")
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3  # it learns
    assert max(norms) > 1.0  # clipping was active, so the norm must be right
    for name, (got_losses, got_norms) in curves.items():
        assert got_losses == pytest.approx(losses, rel=1e-5), name
        assert got_norms == pytest.approx(norms, rel=1e-4), name


@pytest.mark.parametrize("world", [2, 4], ids=["2-ranks", "4-ranks"])
def test_dense_gpt_every_strategy_equals_ddp(world: int, tmp_path) -> None:
    variants = _variants({}, hybrid=world == 4)
    ranks = run_ranks(_train_all, world, str(tmp_path), variants, timeout_s=600)
    for curves in ranks:
        _check(curves)


def test_moe_gpt_with_expert_parallel_every_strategy_equals_ddp(tmp_path) -> None:
    variants = _variants({**MOE, "parallel.ep": "2"}, hybrid=True)
    ranks = run_ranks(_train_all, 4, str(tmp_path), variants, timeout_s=600)
    for curves in ranks:
        _check(curves)


def _layouts(rank: int, world: int, cache: str) -> dict:
    cases = {
        "tp2_sp": {"parallel.tp": "2", "parallel.sequence-parallel": "true"},
        "pp2": {"parallel.pp": "2"},
        "pp2_vpp2": {"parallel.pp": "2", "parallel.vpp": "2", "model.num-layers": "4"},
        "cp2": {"parallel.cp": "2"},
        "grad_accumulation": {"train.global-batch-size": "16"},
    }
    out = {}
    for name, overrides in cases.items():
        overrides = {**overrides, "train.train-iters": "8"}
        ddp = train(config(cache, **overrides)).losses
        fsdp = train(config(cache, **overrides, **FSDP)).losses
        out[name] = (ddp, fsdp)
    return out


def test_fsdp_combines_with_tensor_pipeline_and_context_parallel(tmp_path) -> None:
    ranks = run_ranks(_layouts, 4, str(tmp_path), timeout_s=600)
    for name, (ddp, fsdp) in ranks[0].items():
        assert fsdp == pytest.approx(ddp, rel=1e-5), name


def _bf16(rank: int, world: int, cache: str) -> tuple:
    fp32 = train(config(cache, **{"train.train-iters": "10"})).losses
    bf16 = train(config(cache, **FSDP, **{"train.train-iters": "10", "train.bf16": "true"}))
    return fp32, bf16.losses


def test_bf16_compute_over_fp32_shards_tracks_fp32(tmp_path) -> None:
    fp32, bf16 = run_ranks(_bf16, 2, str(tmp_path), timeout_s=600)[0]
    assert bf16 == pytest.approx(fp32, rel=2e-3)
    assert bf16 != fp32  # it did compute in bf16


def test_distributed_optimizer_is_refused_with_the_field_named(tmp_path) -> None:
    from mcore.core import ConfigError

    with pytest.raises(ConfigError, match="optimizer.use_distributed_optimizer"):
        config(str(tmp_path), **FSDP, **{"optimizer.use-distributed-optimizer": "true"})
