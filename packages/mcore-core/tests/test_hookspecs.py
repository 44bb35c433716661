"""The plugin API: every hook spec is documented and exercised here by a ``test_hook_<name>``."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import pytest

from mcore.core import ConfigError, PluginManager, hookimpl, hookspecs, load_config
from mcore.core import plugin as core_plugin


def _spec_names() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("mcore_")
    ]


def test_every_hook_spec_has_a_docstring_and_a_test() -> None:
    names = _spec_names()
    assert names, "no hook specs found"
    tests = set(dir(sys.modules[__name__]))
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 20, f"hook spec {name} needs a docstring"
        assert f"test_hook_{name}" in tests, f"hook spec {name} needs a test_hook_{name}"


def test_hook_mcore_register() -> None:
    class Plugin:
        @hookimpl
        def mcore_register(self, registry):
            registry.add("dataset", "squares", lambda n: [i * i for i in range(n)])

    manager = PluginManager()
    manager.register(Plugin(), name="squares-plugin")
    assert manager.registries.get("dataset", "squares")(4) == [0, 1, 4, 9]


def test_hook_mcore_validate_config() -> None:
    @dataclass(kw_only=True)
    class Budget:
        max_steps: int = 10
        """Upper bound on train.train_iters."""

    class Plugin:
        @hookimpl
        def mcore_register(self, registry):
            registry.add("config_section", "budget", Budget)

        @hookimpl
        def mcore_validate_config(self, config, errors):
            if config.train.train_iters > config.budget.max_steps:
                errors.add(
                    "train.train_iters", f"exceeds budget.max_steps={config.budget.max_steps}"
                )

    manager = PluginManager()
    manager.register(core_plugin, name="mcore-core")
    manager.register(Plugin(), name="budget")
    assert load_config(overrides={"train.train_iters": "5"}, manager=manager).train.train_iters == 5
    with pytest.raises(ConfigError, match=r"train.train_iters: exceeds budget.max_steps=10"):
        load_config(overrides={"train.train_iters": "50"}, manager=manager)


class Recorder:
    """A plugin that records every lifecycle call it receives."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @hookimpl
    def mcore_on_train_start(self, trainer):
        self.calls.append(("start", trainer))

    @hookimpl
    def mcore_on_step_end(self, trainer, step, metrics):
        self.calls.append(("step", step, metrics["loss"]))

    @hookimpl
    def mcore_on_checkpoint_saved(self, trainer, path):
        self.calls.append(("saved", path))

    @hookimpl
    def mcore_on_train_end(self, trainer):
        self.calls.append(("end", trainer))


@pytest.fixture
def recorder() -> tuple[PluginManager, Recorder]:
    manager = PluginManager()
    rec = Recorder()
    manager.register(rec, name="recorder")
    return manager, rec


def test_hook_mcore_on_train_start(recorder) -> None:
    manager, rec = recorder
    manager.hook.mcore_on_train_start(trainer="T")
    assert rec.calls == [("start", "T")]


def test_hook_mcore_on_step_end(recorder) -> None:
    manager, rec = recorder
    for step in (1, 2):
        manager.hook.mcore_on_step_end(trainer="T", step=step, metrics={"loss": 1.0 / step})
    assert rec.calls == [("step", 1, 1.0), ("step", 2, 0.5)]


def test_hook_mcore_on_checkpoint_saved(recorder) -> None:
    manager, rec = recorder
    manager.hook.mcore_on_checkpoint_saved(trainer="T", path="/ckpt/iter_0000010")
    assert rec.calls == [("saved", "/ckpt/iter_0000010")]


def test_hook_mcore_on_train_end(recorder) -> None:
    manager, rec = recorder
    manager.hook.mcore_on_train_end(trainer="T")
    assert rec.calls == [("end", "T")]


def test_lifecycle_hooks_reach_every_plugin_that_implements_them(recorder) -> None:
    manager, rec = recorder
    other = Recorder()
    manager.register(other, name="other")
    manager.hook.mcore_on_train_start(trainer="T")
    assert rec.calls == other.calls == [("start", "T")]
    assert manager.hooks_of("other") == [
        "mcore_on_checkpoint_saved",
        "mcore_on_step_end",
        "mcore_on_train_end",
        "mcore_on_train_start",
    ]


def test_hook_mcore_training_runtime() -> None:
    class Layout:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def mcore_training_runtime(self, config):
            return None if self.name == "declines" else f"runtime from {self.name}"

    manager = PluginManager()
    manager.register(Layout("declines"), name="declines")
    assert manager.hook.mcore_training_runtime(config=None) is None
    manager.register(Layout("mine"), name="mine")
    # firstresult: the first plugin with an answer wins, the rest are not asked.
    assert manager.hook.mcore_training_runtime(config=None) == "runtime from mine"


def test_hook_mcore_checkpointer() -> None:
    class Checkpoints:
        @hookimpl
        def mcore_checkpointer(self, config, runtime):
            return ("checkpointer", config, runtime)

    manager = PluginManager()
    assert manager.hook.mcore_checkpointer(config="C", runtime="R") is None
    manager.register(Checkpoints(), name="checkpoints")
    assert manager.hook.mcore_checkpointer(config="C", runtime="R") == ("checkpointer", "C", "R")


# --- the training run's extension hooks: the Trainer calls them and applies their answers. The
# --- end-to-end behaviour (a real model trained with them, under PP too) is in
# --- integration-tests/tests/test_plugin_hooks.py.


class _Runtime:
    """A single-process runtime: what Trainer.build and reduce_terms ask of one."""

    class parallel_state:
        rank, pp_size, tp_size, dp_size = 0, 1, 1, 1

    def __init__(self) -> None:
        self.seen: list = []

    def build(self, config, model_config, registries, *, initialize, on_model):
        import torch

        with torch.device("meta"):
            chunks = [torch.nn.Linear(2, 2)]
        on_model(chunks)
        self.seen = chunks
        return chunks, "optimizer", "scheduler"

    def reduce_loss(self, losses):
        return sum(losses) / len(losses)


def _trainer(*plugins):
    from mcore.core.training.trainer import Trainer

    manager = PluginManager()
    for i, plugin in enumerate(plugins):
        manager.register(plugin, name=f"plugin{i}")
    return Trainer(config=None, manager=manager, runtime=_Runtime(), tokenizer=None,
                   model_config=None)  # fmt: skip


def test_hook_mcore_on_model_built() -> None:
    import torch

    class Adapter:
        @hookimpl
        def mcore_on_model_built(self, trainer, chunks):
            assert all(p.is_meta for c in chunks for p in c.parameters())  # before materialising
            chunks[0] = torch.nn.Sequential(chunks[0], torch.nn.Linear(2, 2, device="meta"))
            trainer.state["adapter"] = "added"

    trainer = _trainer(Adapter())
    trainer.build()
    # The runtime materialises, wraps and optimises the list the hook changed.
    assert isinstance(trainer.runtime.seen[0], torch.nn.Sequential)
    assert trainer.chunks is trainer.runtime.seen and trainer.optimizer == "optimizer"
    assert trainer.state == {"adapter": "added"}


def test_hook_mcore_loss_terms() -> None:
    import torch

    class Terms:
        def __init__(self, name, factor):
            self.name, self.factor = name, factor

        @hookimpl
        def mcore_loss_terms(self, trainer, model, batch, lm_loss):
            assert batch == {"tokens": "T"} and model == "M"
            return {self.name: self.factor * lm_loss}

    lm = torch.tensor(2.0, requires_grad=True)
    trainer = _trainer(Terms("a", 3.0), Terms("b", 0.5))
    total, logged = trainer.objective("M", {"tokens": "T"}, lm)
    assert total.item() == 2.0 + 6.0 + 1.0
    total.backward()
    assert float(lm.grad) == 1.0 + 3.0 + 0.5  # every term is in the graph
    assert {k: float(v) for k, v in logged.items()} == {"loss": 9.0, "lm_loss": 2.0, "a": 6.0,
                                                        "b": 1.0}  # fmt: skip
    trainer.lm_loss_weight = 0.0  # train on the terms alone
    total, _ = trainer.objective("M", {"tokens": "T"}, lm)
    assert total.item() == 7.0
    assert trainer.reduce_terms([{"loss": 1, "a": 1.0, "b": 2.0}, {"loss": 1, "a": 3.0, "b": 4.0}]
                                ) == {"a": 2.0, "b": 3.0}  # fmt: skip
    clash = _trainer(Terms("a", 1.0), Terms("a", 2.0))
    with pytest.raises(Exception, match="named 'a'"):
        clash.objective("M", {"tokens": "T"}, lm)
    vector = _trainer(Terms("v", torch.ones(3)))
    with pytest.raises(Exception, match="term 'v' has shape"):
        vector.objective("M", {"tokens": "T"}, lm)


def test_hook_mcore_step_metrics() -> None:
    class Probe:
        @hookimpl
        def mcore_step_metrics(self, trainer, step):
            return {"probe/step": step * 10}

    trainer = _trainer(Probe())
    metrics = {"loss": 1.0}
    trainer.step_metrics(3, metrics)
    assert metrics == {"loss": 1.0, "probe/step": 30.0}

    class Clash:
        @hookimpl
        def mcore_step_metrics(self, trainer, step):
            return {"loss": 0.0}

    with pytest.raises(Exception, match="'loss' is already a metric of step 3"):
        _trainer(Clash()).step_metrics(3, {"loss": 1.0})


def test_hook_mcore_plan_frozen_models() -> None:
    class Teacher:
        @hookimpl
        def mcore_plan_frozen_models(self, config):
            return [("teacher", config, "model config", "bf16")]

    class Nothing:
        @hookimpl
        def mcore_plan_frozen_models(self, config):
            return None

    # Every plugin answers (not firstresult): mcore plan counts all frozen models listed.
    manager = PluginManager()
    manager.register(Nothing(), name="nothing")
    manager.register(Teacher(), name="teacher")
    answers = manager.hook.mcore_plan_frozen_models(config="C")
    assert [spec for specs in answers for spec in specs or []] == [
        ("teacher", "C", "model config", "bf16")
    ]
