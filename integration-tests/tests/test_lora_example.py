"""The example LoRA plugin, examples/lora-plugin, does what its README and help texts say.

Fast tests import the plugin from its source folder and register it with this process's plugin
manager: the adapted layer's math, what is frozen, what the data-parallel wrapper and the
optimizer hold, every ``[lora]`` knob and its checks, tensor parallelism on two gloo ranks.
Slow tests (marked ``slow``) build its wheel in its own folder, install it into a fresh venv
with wheels of this checkout, and run ``mcore train --lora.rank 4`` there: the adapters train,
``lora/b_norm`` is logged, and the saved base weights are exactly the initial ones.
"""

from __future__ import annotations

import importlib
import json
import math
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcore.core import (
    ConfigError,
    PluginManager,
    get_plugin_manager,
    load_config,
    register_plugin,
    unregister_plugin,
)
from mcore.core.testing import run_ranks

LORA_SRC = Path(__file__).resolve().parents[2] / "examples" / "lora-plugin" / "src"
TINY_MODEL = {
    "model.num-layers": "2",
    "model.hidden-size": "32",
    "model.num-attention-heads": "4",
    "model.ffn-hidden-size": "64",
}


# --- in this workspace: the plugin from its source folder ------------------------------------


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginManager]:
    """The workspace's plugins plus the example, registered under its entry-point name."""
    monkeypatch.syspath_prepend(str(LORA_SRC))
    register_plugin(importlib.import_module("mcore_example_lora.plugin"), name="example-lora")
    yield get_plugin_manager()
    unregister_plugin("example-lora")


def _trainer(manager: PluginManager, extra: dict[str, str] | None = None, **lora: str):
    """A built tiny GPT run (model, DDP wrapper, optimizer) with ``lora.<knob>`` overrides."""
    from mcore.core.training.trainer import setup_trainer

    overrides = {
        **TINY_MODEL,
        "train.device": "cpu",
        "train.seq-length": "16",
        "train.micro-batch-size": "2",
        **{f"lora.{k}": v for k, v in lora.items()},
        **(extra or {}),
    }
    config = load_config(overrides=overrides, manager=manager)
    trainer = setup_trainer(config, manager)
    trainer.build(initialize=True)
    return trainer


def _model(trainer):
    from mcore.parallel.sharding import unwrap

    return unwrap(trainer.chunks[0])


def _lora_names(targets: list[str], layers: int = 2) -> set[str]:
    where = {"linear_proj": "self_attention.linear_proj", "linear_fc2": "mlp.linear_fc2"}
    return {f"layers.{i}.{where[t]}.lora.{m}" for i in range(layers) for t in targets for m in "AB"}


def test_rank_0_leaves_the_model_as_it_is(manager: PluginManager) -> None:
    trainer = _trainer(manager)  # lora.rank defaults to 0

    assert trainer.config.lora.rank == 0
    named = dict(_model(trainer).named_parameters())
    assert not any(".lora." in n for n in named)
    assert all(p.requires_grad for p in named.values())
    assert "example-lora" not in trainer.state
    assert trainer.step_metrics(1, metrics := {"loss": 1.0}) is None and metrics == {"loss": 1.0}


@pytest.mark.parametrize(
    "targets",
    [["linear_proj", "linear_fc2"], ["linear_proj"], ["linear_fc2"]],
    ids=["default", "attention-only", "mlp-only"],
)
def test_only_the_adapters_of_the_targets_train(manager: PluginManager, targets) -> None:
    knobs = {"rank": "2"} if len(targets) == 2 else {"rank": "2", "targets": ",".join(targets)}
    trainer = _trainer(manager, **knobs)
    model, ddp, optimizer = _model(trainer), trainer.chunks[0], trainer.optimizer
    named = dict(model.named_parameters())
    lora = _lora_names(targets)

    assert trainer.config.lora.targets == tuple(targets)
    assert {n for n, p in named.items() if p.requires_grad} == lora
    assert {n for n in named if ".lora." in n} == lora, "no adapter on a layer not targeted"
    # Base weights keep their checkpoint keys; adapters add theirs.
    assert "layers.0.self_attention.linear_proj.weight" in model.state_dict()
    assert "layers.0.mlp.linear_fc2.weight" in model.state_dict()
    # The data-parallel wrapper reduces, and the optimizer steps, the adapters alone.
    assert {id(p) for p in ddp.params} == {id(named[n]) for n in lora}
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(stepped) == len(lora)
    assert {p.data_ptr() for p in stepped} == {named[n].data_ptr() for n in lora}

    # One forward and backward: B starts at zero, so the model is the base model, A gets no
    # gradient yet, B does, and no frozen weight gets one.
    tokens = torch.randint(0, 100, (2, 16))
    loss = trainer.chunks[0](tokens, labels=tokens).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    for n in lora:
        p = named[n]
        assert p.grad is None and p.main_grad.shape == p.shape  # DDP holds it in main_grad
        if n.endswith(".B"):
            assert torch.equal(p.detach(), torch.zeros_like(p)), f"{n} must start at zero"
            assert p.main_grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.detach().std() > 0, f"{n} must start random"
            assert torch.equal(p.main_grad, torch.zeros_like(p)), f"{n}: B = 0 blocks A's grad"
    for n, p in named.items():
        if n not in lora:
            assert p.grad is None and not hasattr(p, "main_grad"), f"frozen {n} got a gradient"


def test_the_adapted_layer_adds_alpha_over_rank_times_b_of_a(manager: PluginManager) -> None:
    trainer = _trainer(manager, rank="3", alpha="5.0", targets="linear_fc2")
    layer = _model(trainer).get_submodule("layers.0.mlp.linear_fc2")
    A, B = layer.lora.A, layer.lora.B
    assert tuple(A.shape) == (3, 64) and tuple(B.shape) == (32, 3)
    x = torch.randn(16, 2, 64)

    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)), "B = 0: no change"
        B.copy_(torch.randn_like(B))
        want = F.linear(x, layer.weight, layer.bias) + 5.0 / 3 * F.linear(F.linear(x, A), B)
        torch.testing.assert_close(layer(x), want)

    # Only the adapter gets gradients (the data-parallel wrapper keeps them in main_grad).
    layer(x).square().sum().backward()
    assert A.main_grad.abs().sum() > 0 and B.main_grad.abs().sum() > 0
    assert layer.weight.grad is None and not hasattr(layer.weight, "main_grad")


def test_step_metrics_report_the_global_norm_of_every_b(manager: PluginManager) -> None:
    trainer = _trainer(manager, {"logger.log-interval": "2"}, rank="2")
    trainer.open_logger(resumed=False)
    adapters = [m for m in _model(trainer).modules() if type(m).__name__ == "LoRAAdapter"]
    assert len(adapters) == 4  # 2 layers x (linear_proj, linear_fc2)

    metrics = {"loss": 1.0}
    trainer.step_metrics(1, metrics)
    assert metrics == {"loss": 1.0}, "read only on the steps that are logged"
    trainer.step_metrics(2, metrics)
    assert metrics == {"loss": 1.0, "lora/b_norm": 0.0}

    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            adapter.B.fill_(i + 1.0)
    metrics = {"loss": 1.0}
    trainer.step_metrics(4, metrics)
    want = math.sqrt(sum((i + 1.0) ** 2 * 32 * 2 for i in range(4)))
    assert metrics["lora/b_norm"] == pytest.approx(want)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora.rank": "-1"}, "lora.rank: must be >= 0 (0 turns LoRA off), got -1"),
        ({"lora.rank": "4", "lora.alpha": "0"}, "lora.alpha: must be > 0, got 0.0"),
        ({"lora.targets": "linear_fc2,linear_fc2"}, "lora.targets: names a layer twice"),
        (
            {"lora.targets": "linear_qkv"},
            "lora.targets: must be one of 'linear_proj', 'linear_fc2'",
        ),
        (
            {"lora.rank": "4", "train.data-parallel": "megatron_fsdp"},
            "lora.rank: the example LoRA plugin runs with train.data_parallel = 'ddp' only",
        ),
    ],
    ids=["negative-rank", "zero-alpha", "duplicate-target", "unknown-target", "fsdp"],
)
def test_bad_lora_settings_are_refused_up_front(
    manager: PluginManager, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=overrides, manager=manager)
    assert message in str(caught.value)


def test_every_knob_has_help(manager: PluginManager) -> None:
    from mcore_example_lora.config import LoRAConfig

    from mcore.core.config import field_docs

    docs = field_docs(LoRAConfig)
    assert set(docs) == {"rank", "alpha", "targets"}
    assert "0 turns LoRA off" in docs["rank"] and "alpha / rank" in docs["alpha"]
    assert "'linear_proj'" in docs["targets"] and "'linear_fc2'" in docs["targets"]


def _check_tensor_parallel(rank: int, world_size: int, src: str) -> None:
    """An adapted row-parallel layer on TP 2 (with and without sequence parallelism) equals
    the single-process math on the full tensors: output, input and adapter gradients. Its A is
    initialised as the TP 1 adapter's, and its layout and grad-norm flags say how it is split."""
    import sys

    sys.path.insert(0, src)
    from mcore_example_lora.lora import add_lora

    from mcore.parallel import ParallelState, RowParallelLinear

    s, b, h, out, r, alpha = 8, 2, 16, 6, 4, 3.0

    def adapted(tp_group, sp: bool) -> nn.Module:
        holder = nn.Module()
        holder.linear_proj = RowParallelLinear(
            h, out, tp_group=tp_group, sequence_parallel=sp, input_is_parallel=True
        )
        add_lora([holder], rank=r, alpha=alpha, targets=["linear_proj"])
        return holder.linear_proj

    torch.manual_seed(0)
    full = adapted(None, False)  # TP 1: every tensor whole
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        full.lora.B.copy_(torch.randn(out, r, generator=gen))
    x_full = torch.randn(s, b, h, generator=gen, requires_grad=True)
    grad_full = torch.randn(s, b, out, generator=gen)
    (full(x_full) * grad_full).sum().backward()

    state = ParallelState(tp=world_size)
    for sp in (False, True):
        torch.manual_seed(0)
        layer = adapted(state.tp_group, sp)
        A, B = layer.lora.A, layer.lora.B
        assert torch.equal(A.detach(), full.lora.A.detach().chunk(world_size, dim=1)[rank])
        assert A.tensor_model_parallel and not B.tensor_model_parallel
        assert layer.lora.shard_layout("A").global_shape == (r, h)
        assert layer.lora.shard_layout("B") is None
        assert getattr(B, "reduce_grad_over_tp", False) == sp
        with torch.no_grad():
            layer.weight.copy_(layer.shard_weight(full.weight))
            B.copy_(full.lora.B)
        x = x_full.detach().chunk(world_size, dim=-1)[rank].requires_grad_(True)
        grad = grad_full.chunk(world_size)[rank] if sp else grad_full
        y = layer(x)
        (y * grad).sum().backward()
        if sp:  # what the data-parallel wrapper does for parameters marked so
            torch.distributed.all_reduce(B.grad, group=state.tp_group)
        y_want = full(x_full).detach()
        y_want = y_want.chunk(world_size)[rank] if sp else y_want
        torch.testing.assert_close(y, y_want, msg=f"output, sp={sp}")
        dx_want = x_full.grad.chunk(world_size, dim=-1)[rank]
        torch.testing.assert_close(x.grad, dx_want, msg=f"input grad, sp={sp}")
        dA_want = full.lora.A.grad.chunk(world_size, dim=1)[rank]
        torch.testing.assert_close(A.grad, dA_want, msg=f"A grad, sp={sp}")
        torch.testing.assert_close(B.grad, full.lora.B.grad, msg=f"B grad, sp={sp}")
        assert layer.weight.grad is None


def test_adapters_split_over_tensor_parallel_ranks_compute_the_same() -> None:
    run_ranks(_check_tensor_parallel, 2, str(LORA_SRC), backend="gloo")


# --- installed: the wheel in a fresh venv ------------------------------------------------------

TRAIN_FLAGS = {
    "train.train-iters": "4",
    "train.micro-batch-size": "2",
    "train.seq-length": "32",
    "train.device": "cpu",
    "data.max-bytes": "100000",
    **TINY_MODEL,
    "optimizer.lr": "1e-2",
    "logger.log-interval": "1",
    "lora.rank": "4",
}

# Loading every plugin must stay light: the plugin imports torch only when a model is built.
LOAD_PLUGINS = textwrap.dedent(
    """
    import json, sys
    from mcore.core import get_plugin_manager

    get_plugin_manager()
    print(json.dumps({
        "torch": "torch" in sys.modules,
        "lora_module": "mcore_example_lora.lora" in sys.modules,
    }))
    """
)

# The initial model of the run (same config and seed, built as `mcore train` builds it), and
# the checkpoint the run saved, read with torch.distributed.checkpoint.
COMPARE_WITH_INITIAL = textwrap.dedent(
    """
    import json, os
    import torch
    import torch.distributed.checkpoint as dcp
    from mcore.core import get_plugin_manager, load_config
    from mcore.core.training.trainer import setup_trainer
    from mcore.parallel.sharding import unwrap

    config = load_config(overrides=json.loads(os.environ["LORA_OVERRIDES"]))
    trainer = setup_trainer(config, get_plugin_manager())
    trainer.build(initialize=True)
    model = unwrap(trainer.chunks[0])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    path = os.environ["LORA_CKPT"]
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {"model." + k: torch.empty_like(v) for k, v in initial.items()
             if "model." + k in stored}
    dcp.load(saved, checkpoint_id=path, no_dist=True)
    print(json.dumps({
        "keys": sorted(initial),
        "trainable": sorted(trainable),
        "not_stored": sorted(k for k in initial if "model." + k not in stored),
        "unchanged": sorted(k for k in initial if torch.equal(initial[k], saved["model." + k])),
        "optimizer_state": sorted(
            {k.split(".", 2)[2].rsplit(".", 1)[0] for k in stored
             if k.startswith("optimizer.state.")}
        ),
        "b_zero_at_start": all(not initial[k].any() for k in initial if k.endswith("lora.B")),
    }))
    """
)


@pytest.fixture(scope="module")
def venv(make_venv, lora_plugin_wheel):
    # mcore-ckpt so that the run saves a checkpoint; the wheel brings mcore-models and the rest.
    return make_venv(lora_plugin_wheel, "mcore-ckpt")


@pytest.mark.slow
def test_mcore_plugins_lists_the_lora_section_and_loads_light(venv) -> None:
    report = venv.mcore_json("plugins", "--json")
    plugins = {p["name"]: p for p in report["plugins"]}
    assert report["failed"] == []
    assert plugins["example-lora"]["package"] == "mcore-example-lora"
    assert plugins["example-lora"]["components"] == {"config_section": ["lora"]}

    result = venv.python(LOAD_PLUGINS)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"torch": False, "lora_module": False}

    refused = venv.run("mcore", "train", "--nproc", "1", "--lora.rank", "-1")
    assert refused.returncode == 2
    assert "lora.rank: must be >= 0" in refused.stderr


@pytest.mark.slow
def test_mcore_train_with_lora_trains_only_the_adapters(venv, tmp_path: Path) -> None:
    save = tmp_path / "run"
    flags = {**TRAIN_FLAGS, "data.cache-dir": str(tmp_path / "cache")}
    args = [a for key, value in flags.items() for a in (f"--{key}", value)]
    result = venv.run("mcore", "train", "--nproc", "1", *args, "--checkpoint.save", str(save))
    assert result.returncode == 0, result.stdout + result.stderr

    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    b_norms = [r["lora/b_norm"] for r in records]
    # B starts at zero (checked below) and moves from the first step on.
    assert 0 < b_norms[0] < b_norms[1] < b_norms[2] < b_norms[3], b_norms

    compared = venv.python(
        COMPARE_WITH_INITIAL,
        LORA_OVERRIDES=json.dumps(flags),
        LORA_CKPT=str(save / "iter_0000004"),
    )
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    lora = _lora_names(["linear_proj", "linear_fc2"])
    assert set(report["trainable"]) == lora
    assert report["b_zero_at_start"]
    assert report["not_stored"] == []
    # Every base weight is exactly as initialised; every adapter tensor moved.
    keys = set(report["keys"])
    assert lora < keys and "layers.1.mlp.linear_fc2.weight" in keys
    assert set(report["unchanged"]) == keys - lora
    # Only the adapters have optimizer state.
    assert set(report["optimizer_state"]) == lora
