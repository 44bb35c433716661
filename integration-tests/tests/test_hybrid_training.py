"""``mcore train`` with a hybrid layer pattern (Mamba-2 ``M``, gated delta net ``G``, attention
``*``, MLP ``-``, MoE ``E``, a ``|`` stage boundary) gives the single-process loss curve under
TP, SP, PP by the pattern's ``|``, TP x PP, EP and megatron-fsdp (fp32, gloo ranks), and a
checkpoint saved in one layout resumes in another."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

STEPS = 20
PATTERN = "MG*-E|M*E"  # PP2 places 5 layers on stage 0 and 3 on stage 1, by the |


def config(cache_dir: str, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "8",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "8",
        "model.hybrid-override-pattern": PATTERN,
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "model.num-query-groups": "2",
        "model.ffn-hidden-size": "64",
        "moe.num-experts": "4",
        "moe.router-topk": "2",
        "moe.ffn-hidden-size": "32",
        "ssm.mamba-head-dim": "8",
        "ssm.mamba-num-groups": "2",
        "ssm.mamba-state-dim": "8",
        "ssm.mamba-chunk-size": "16",
        "ssm.linear-num-key-heads": "2",
        "ssm.linear-num-value-heads": "4",
        "ssm.linear-key-head-dim": "8",
        "ssm.linear-value-head-dim": "8",
        "ssm.linear-chunk-size": "16",
        "optimizer.lr": "2e-3",
        "optimizer.lr-warmup-iters": "2",
        "optimizer.clip-grad": "1.0",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data-cache"))
    return cache, train(config(cache)).losses


def _run(rank, world, cache, overrides):
    return train(config(cache, **overrides)).losses


LAYOUTS = {
    "tp2_sp": (2, {"parallel.tp": "2", "parallel.sequence-parallel": "true"}),
    "pp2": (2, {"parallel.pp": "2"}),
    "tp2_pp2_sp": (
        4,
        {"parallel.tp": "2", "parallel.pp": "2", "parallel.sequence-parallel": "true"},
    ),
    "ep2": (2, {"parallel.ep": "2"}),
    "megatron_fsdp": (
        2,
        {
            "train.data-parallel": "megatron_fsdp",
            "fsdp.data-parallel-sharding-strategy": "optim_grads_params",
        },
    ),
    "dp2_distributed_optimizer_recompute": (
        2,
        {"optimizer.use-distributed-optimizer": "true", "model.recompute-granularity": "full"},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hybrid_loss_curve_matches_one_process(reference, layout) -> None:
    cache, expected = reference
    world, overrides = LAYOUTS[layout]
    curves = run_ranks(_run, world, cache, overrides, backend="gloo", timeout_s=600)
    assert len(expected) == STEPS and expected[-1] < expected[0] - 0.5
    for curve in curves:
        assert curve == pytest.approx(expected, rel=1e-5)


def _reshard(rank: int, world: int, cache: str, tmp: str) -> list[float]:
    """Steps 1-3 under TP2 (saved), steps 4-6 resumed under PP2."""
    short = {"train.train-iters": "6"}
    first = {
        "parallel.tp": "2",
        "parallel.sequence-parallel": "true",
        "checkpoint.save": f"{tmp}/saved",
        "train.exit-interval": "3",
    }
    train(config(cache, **short, **first))
    resume = {"parallel.pp": "2", "checkpoint.load": f"{tmp}/saved", "checkpoint.save": tmp}
    return train(config(cache, **short, **resume)).losses


def test_hybrid_checkpoint_saved_under_tp2_resumes_under_pp2(reference, tmp_path) -> None:
    cache, _ = reference
    expected = train(config(cache, **{"train.train-iters": "6"})).losses
    curves = run_ranks(_reshard, 2, cache, str(tmp_path), backend="gloo", timeout_s=600)
    for curve in curves:
        assert curve == pytest.approx(expected[3:], rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parallel.pp": "4"}, "has 2 '|'-separated segments but the layout has 4"),
        ({"parallel.cp": "2"}, "do not support context parallelism"),
        ({"model.hybrid-override-pattern": "MX*-E|M*E"}, "layer symbol 'X' is not registered"),
        ({"model.num-layers": "6"}, "has 8 layer symbols but num_layers is 6"),
        ({"parallel.tp": "4"}, "ssm.mamba_num_groups: 2 does not divide"),
    ],
)
def test_bad_hybrid_layouts_are_refused_naming_the_field(overrides, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        config(str(tmp_path), **overrides)
