"""The training run's extension hooks on a real ``mcore train`` run: a module added by
``mcore_on_model_built`` is materialised, trained and checkpointed; a ``mcore_loss_terms`` term
reaches backward (and the logs); ``mcore_step_metrics`` reach metrics.jsonl; every hook gets the
same typed Trainer."""

from __future__ import annotations

import json

import pytest
import torch

from mcore.core import PluginManager, hookimpl, load_config
from mcore.core.training.loop import train
from mcore.core.training.trainer import Trainer


def _config(cache: str, **overrides: str):
    base = {
        "train.train-iters": "3",
        "train.micro-batch-size": "2",
        "train.global-batch-size": "4",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "optimizer.clip-grad": "0",
        "logger.log-interval": "1",
    }
    return load_config(overrides={**base, **overrides})


class Extension:
    """Adds a trainable gate (zeros) to the model, a loss term 3 x the LM loss + (gate - 1)^2,
    and the gate as a metric."""

    def __init__(self) -> None:
        self.trainers: set[int] = set()

    @hookimpl
    def mcore_on_model_built(self, trainer, chunks):
        from mcore.parallel.init import ZEROS, set_init

        self.trainers.add(id(trainer))
        gate = torch.nn.Parameter(torch.empty(1, device="meta"))
        chunks[0].register_parameter("extension_gate", set_init(gate, ZEROS))

    @hookimpl
    def mcore_loss_terms(self, trainer, model, batch, lm_loss):
        self.trainers.add(id(trainer))
        gate = next(p for n, p in model.named_parameters() if n.endswith("extension_gate"))
        return {"ext/term": 3.0 * lm_loss + (gate - 1.0).pow(2).sum()}

    @hookimpl
    def mcore_step_metrics(self, trainer, step):
        assert isinstance(trainer, Trainer) and trainer.iteration == step
        gate = next(p for n, p in trainer.chunks[0].named_parameters() if "extension_gate" in n)
        return {"ext/gate": float(gate.detach().sum())}


def test_a_plugin_adds_a_module_a_loss_term_and_a_metric(tmp_path) -> None:
    cache, save = str(tmp_path / "cache"), tmp_path / "run"
    manager = PluginManager().load_entry_points()
    extension = Extension()
    manager.register(extension, name="extension")
    result = train(_config(cache, **{"checkpoint.save": str(save)}), manager=manager)
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    gates = [0.0] + [r["ext/gate"] for r in rows]  # before each step: its recipe (0), then...
    for row, gate in zip(rows, gates, strict=False):
        # The objective is the LM loss plus the term, 3 lm + (gate - 1)^2.
        assert row["loss"] == pytest.approx(row["lm_loss"] + row["ext/term"], rel=1e-6)
        assert row["ext/term"] == pytest.approx(3 * row["lm_loss"] + (gate - 1) ** 2, rel=1e-5)
    # The gate started at its recipe (0) and the term's gradient pulled it towards 1.
    assert 0.0 < rows[0]["ext/gate"] < rows[-1]["ext/gate"] < 1.0
    assert len(extension.trainers) == 1  # one Trainer object for the whole run
    assert result.losses == [r["loss"] for r in rows]

    baseline = train(_config(cache))
    # The first step's gradient: 4 x the model's (lm + 3 lm) and d(gate - 1)^2 = -2 at gate 0.
    expected = ((4 * baseline.grad_norms[0]) ** 2 + 2.0**2) ** 0.5
    assert rows[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert rows[0]["lm_loss"] == pytest.approx(baseline.losses[0], rel=1e-6)

    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(save / "iter_0000003")).read_metadata().state_dict_metadata
    assert any("extension_gate" in key for key in keys)  # checkpointed with the model
