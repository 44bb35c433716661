"""``mcore train`` checkpoints reshard: save under one parallel layout, resume under another.

Every case trains 6 steps uninterrupted as the reference, then trains 3 steps under a layout A
(stopping with ``train.exit-interval``, which saves), and resumes steps 4-6 under a layout B.
The resumed losses must equal the reference's: the first one checks the loaded weights (the
model's output on the same batch), the later ones the loaded optimizer state. Layouts change
in TP, PP, DP, EP and between DDP and megatron_fsdp. Separately, 10 + 10 steps equal 20
uninterrupted ones, in the same layout and with a changed DP size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcore.ckpt import CheckpointingException
from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

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
        "train.train-iters": "6",
        "train.micro-batch-size": "2",
        "train.global-batch-size": "8",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache_dir,
        "model.num-layers": "4",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "model.num-query-groups": "2",
        "model.ffn-hidden-size": "64",
        "optimizer.lr": "3e-3",
        "optimizer.lr-warmup-iters": "2",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


def _reshard(rank: int, world: int, tmp: str, base: dict, save: dict, loads: dict) -> dict:
    """The reference curve, one save under ``save``, a resume under each of ``loads``."""
    cache = f"{tmp}/cache"
    out = {"reference": train(config(cache, **base)).losses}
    first = train(config(cache, **base, **save, **{"checkpoint.save": f"{tmp}/saved",
                                                   "train.exit-interval": "3"}))  # fmt: skip
    out["first"] = first.losses
    for name, layout in loads.items():
        where = {"checkpoint.load": f"{tmp}/saved", "checkpoint.save": f"{tmp}/{name}"}
        resumed = train(config(cache, **base, **layout, **where))
        out[name] = resumed.losses
    return out


def _check(out: dict, rel: dict[str, float] | None = None) -> None:
    reference = out.pop("reference")
    assert out.pop("first") == pytest.approx(reference[:3], rel=1e-5)
    for name, losses in out.items():
        assert losses == pytest.approx(reference[3:], rel=(rel or {}).get(name, 1e-5)), name


def test_tp2_pp2_loads_as_dp4_as_pp4_and_under_megatron_fsdp(tmp_path: Path) -> None:
    loads = {
        "dp4": {},
        "pp4": {"parallel.pp": "4"},
        "pp2_interleaved": {"parallel.pp": "2", "parallel.vpp": "2"},
        "megatron_fsdp_dp4": FSDP,
    }
    save = {"parallel.tp": "2", "parallel.pp": "2"}
    ranks = run_ranks(_reshard, 4, str(tmp_path), {}, save, loads, timeout_s=900)
    _check(ranks[0])


def test_megatron_fsdp_hybrid_loads_as_ddp_with_the_distributed_optimizer(tmp_path) -> None:
    save = {**FSDP, "fsdp.num-distributed-optimizer-instances": "2"}
    loads = {
        "ddp_distopt_tp2": {"optimizer.use-distributed-optimizer": "true", "parallel.tp": "2"},
        "fsdp_dp4": FSDP,
        # The tied output embedding: one tensor saved, a copy on the last stage loaded.
        "pp2_tp2": {"parallel.pp": "2", "parallel.tp": "2"},
    }
    ranks = run_ranks(_reshard, 4, str(tmp_path), {}, save, loads, timeout_s=900)
    _check(ranks[0])


def test_moe_ep2_loads_as_ep4_and_under_megatron_fsdp(tmp_path: Path) -> None:
    loads = {
        "ep4": {"parallel.ep": "4"},
        "ep2_megatron_fsdp": {**FSDP, "parallel.ep": "2"},
        "ep1_tp2": {"parallel.tp": "2", "parallel.sequence-parallel": "true"},
    }
    base = {**MOE, "model.num-layers": "2"}
    ranks = run_ranks(_reshard, 4, str(tmp_path), base, {"parallel.ep": "2"}, loads,
                      timeout_s=900)  # fmt: skip
    # Tensor parallelism splits the experts' matmuls, which rounds differently (about 1e-5
    # relative on this model, uninterrupted too); the other layouts compute the same sums.
    _check(ranks[0], rel={"ep1_tp2": 1e-4})


def _ten_and_ten(rank: int, world: int, tmp: str, resume: bool) -> list[float]:
    cache = f"{tmp}/cache"
    twenty = {"train.train-iters": "20", "model.num-layers": "2"}
    if not resume:
        # Saved in the background (async), while the run goes on to its exit.
        saving = {
            "checkpoint.save": f"{tmp}/run",
            "checkpoint.save-interval": "5",
            "checkpoint.async-save": "true",
            "train.exit-interval": "10",
        }
        train(config(cache, **twenty, **saving))
        return train(config(cache, **twenty)).losses
    where = {"checkpoint.load": f"{tmp}/run", "checkpoint.save": f"{tmp}/run-{world}"}
    return train(config(cache, **twenty, **where)).losses


def test_ten_steps_saved_and_ten_resumed_equal_twenty(tmp_path: Path) -> None:
    twenty = run_ranks(_ten_and_ten, 2, str(tmp_path), False, timeout_s=900)[0]
    same_layout = run_ranks(_ten_and_ten, 2, str(tmp_path), True, timeout_s=900)[0]
    assert same_layout == twenty[10:]  # exactly: the same arithmetic in the same order
    more_ranks = run_ranks(_ten_and_ten, 4, str(tmp_path), True, timeout_s=900)[0]
    assert more_ranks == pytest.approx(twenty[10:], rel=1e-5)  # other reduction order
    common = json.loads((tmp_path / "run" / "iter_0000010" / "common.json").read_text())
    assert common["iteration"] == 10 and common["consumed_samples"] == 80
    assert common["layout"]["dp_size"] == 2 and common["scheduler"]["num_steps"] == 10


def test_another_model_config_is_refused_naming_the_fields(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    save = str(tmp_path / "run")
    train(config(cache, **{"train.train-iters": "3", "checkpoint.save": save}))
    wrong = config(cache, **{"model.hidden-size": "64", "checkpoint.load": save})
    with pytest.raises(
        CheckpointingException, match="model.hidden_size: checkpoint 32, this run 64"
    ):
        train(wrong)
    with pytest.raises(CheckpointingException, match="checkpoint.load: .*does not exist"):
        train(config(cache, **{"checkpoint.load": str(tmp_path / "nothing")}))
