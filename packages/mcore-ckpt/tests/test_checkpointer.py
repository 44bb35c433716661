"""The checkpointer ``mcore train`` uses: asynchronous saves, abort, resume of the whole state.

One process, a plain linear model under mcore's mixed-precision optimizer (AdamW), so the
checkpointer is exercised without a model package.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from mcore.ckpt import Checkpointer, read_common, resolve
from mcore.core import PluginManager, load_config
from mcore.parallel import ParallelState
from mcore.parallel.optimizer import build_adam, build_lr_scheduler


def _config(tmp: Path, **overrides: str):
    manager = PluginManager().load_entry_points(only=["mcore-parallel", "mcore-ckpt"])
    base = {"checkpoint.save": str(tmp / "run"), "optimizer.lr": "1e-2", "train.train-iters": "9"}
    return load_config(overrides={**base, **overrides}, manager=manager)


def _state(config, seed: int = 0, size: int = 64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(size, size), torch.nn.Linear(size, 4))
    ps = ParallelState()
    optimizer = build_adam(model, ps, config)
    scheduler = build_lr_scheduler(optimizer, config)
    return model, optimizer, scheduler, SimpleNamespace(parallel_state=ps)


def _step(model, optimizer, scheduler, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, model[0].in_features, generator=g)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    scheduler.step()


def test_async_save_resumes_the_exact_state(tmp_path: Path) -> None:
    config = _config(tmp_path, **{"checkpoint.async-save": "true"})
    model, optimizer, scheduler, runtime = _state(config)
    checkpointer = Checkpointer(config, runtime)
    for step in (1, 2):
        _step(model, optimizer, scheduler, step)
    assert checkpointer.save(2, [model], optimizer, scheduler, {"consumed_samples": 16}) is None
    _step(model, optimizer, scheduler, 3)  # training goes on while the save is written
    (published,) = checkpointer.finalize()
    assert Path(published) == tmp_path / "run" / "iter_0000002"
    after_three = [p.detach().clone() for p in model.parameters()]

    # A fresh process state (other weights) resumes at step 2 and takes step 3 again.
    model2, optimizer2, scheduler2, runtime2 = _state(config, seed=1)
    loop = Checkpointer(config, runtime2).load([model2], optimizer2, scheduler2)
    assert loop == {"iteration": 2, "consumed_samples": 16}
    assert scheduler2.num_steps == 2
    _step(model2, optimizer2, scheduler2, 3)
    for a, b in zip(after_three, model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_abort_publishes_nothing_and_the_next_save_works(tmp_path: Path) -> None:
    config = _config(tmp_path, **{"checkpoint.async-save": "true"})
    # Large enough that its write takes longer than calling abort does.
    model, optimizer, scheduler, runtime = _state(config, size=2048)
    checkpointer = Checkpointer(config, runtime)
    _step(model, optimizer, scheduler, 1)
    checkpointer.save(1, [model], optimizer, scheduler, {})
    checkpointer.wait()
    checkpointer.save(2, [model], optimizer, scheduler, {})
    checkpointer.abort()
    assert resolve(tmp_path / "run").name == "iter_0000001"
    assert not (tmp_path / "run" / "iter_0000002.tmp").exists()
    assert checkpointer.poll() == [str(tmp_path / "run" / "iter_0000001")]
    checkpointer.save(3, [model], optimizer, scheduler, {})
    assert checkpointer.finalize() == [str(tmp_path / "run" / "iter_0000003")]
    assert read_common(resolve(tmp_path / "run"))["iteration"] == 3
