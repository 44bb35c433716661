"""fsdp_dtensor checkpoints: save on N ranks, load on M, and training goes on as if unbroken.

The uninterrupted run trains 10 steps at the loading world size; the interrupted one trains 5
steps at the saving world size (and, for 2 -> 4, another strategy on a hybrid mesh), saves model
and AdamW state, and a freshly built model with different initial weights loads them and trains
the last 5 steps. The global batch is the same at every world size, so all losses must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp_testing import adamw, build, run_ranks, shard, train
from torch.distributed.device_mesh import init_device_mesh

from megatron_fsdp import load_checkpoint, save_checkpoint


def _save(rank: int, world: int, path: str, strategy: str, mesh_shape: tuple) -> list[float]:
    model = shard(build(), init_device_mesh("cpu", mesh_shape), strategy)
    optimizer = adamw(model)
    losses = train(model, optimizer, rank, world, 5)
    save_checkpoint(path, model, optimizer)
    return losses


def _resume(rank: int, world: int, path: str, strategy: str, mesh_shape: tuple) -> tuple:
    mesh = init_device_mesh("cpu", mesh_shape)
    model = shard(build(seed=1), mesh, strategy)  # other weights: the load must replace them
    optimizer = adamw(model)
    load_checkpoint(path, model, optimizer)
    resumed = train(model, optimizer, rank, world, 5, start=5)
    model = shard(build(), mesh, strategy)
    unbroken = train(model, adamw(model), rank, world, 10)
    return resumed, unbroken


@pytest.mark.parametrize(
    "save, load",
    [
        ((4, "optim_grads_params", (4,)), (2, "optim_grads_params", (2,))),
        ((2, "optim_grads", (2,)), (4, "optim_grads_params", (2, 2))),
    ],
    ids=["4-to-2", "2-to-4-hybrid"],
)
def test_a_checkpoint_resumes_at_another_world_size(tmp_path: Path, save, load) -> None:
    path = str(tmp_path / "ckpt")
    first = run_ranks(_save, save[0], path, *save[1:])[0]
    resumed, unbroken = run_ranks(_resume, load[0], path, *load[1:])[0]
    torch.testing.assert_close(
        torch.tensor(first + resumed), torch.tensor(unbroken), rtol=1e-5, atol=1e-6
    )
