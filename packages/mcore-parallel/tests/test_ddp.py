"""Data-parallel training on real gloo ranks equals one process on the whole batch.

A small MLP trains for a few steps with each rank on its slice of every global batch. After
every variant (plain DDP, gradient accumulation over micro-batches, averaging in the collective,
no overlap, CPU offload, SGD with clipping, the distributed optimizer on 2 and 4 ranks with and
without the fp32-accumulating reduce-scatter) the parameters equal a single process running
``torch.optim`` on the full batch, and so do the grad norms that ``step()`` reports.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.core import Config, get_registry
from mcore.core.sections import OptimizerConfig, TrainConfig
from mcore.core.testing import run_ranks
from mcore.parallel import (
    DDPConfig,
    DistributedDataParallel,
    DistributedOptimizer,
    MixedPrecisionOptimizer,
    ParallelState,
)

IN, HIDDEN, OUT = 8, 16, 4
GLOBAL_BATCH, STEPS = 8, 6
LR, WEIGHT_DECAY = 1e-2, 0.1
TINY_BUCKETS_MB = 200 / 2**20  # ~50 fp32 gradients per bucket: the MLP spans three buckets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.Tanh(),
        nn.LayerNorm(HIDDEN),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, OUT),
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def _reference(optimizer: str, clip_grad: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, the whole batch, plain torch: the final parameters and each step's norm."""
    model = _model()
    params = list(model.named_parameters())
    groups = [
        {"params": [p for _, p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
        {"params": [p for _, p in params if p.ndim == 1], "weight_decay": 0.0},
    ]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    else:
        opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    norms = []
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        max_norm = clip_grad if clip_grad > 0 else math.inf
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return model.state_dict(), norms


def _config(ddp: DDPConfig, **optimizer: object) -> Config:
    return Config(
        {
            "train": TrainConfig(train_iters=STEPS),
            "optimizer": OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY, **optimizer),
            "ddp": ddp,
        }
    )


def _train(rank: int, world_size: int, config: Config, microbatches: int) -> dict:
    """Wrap and build from the registries by name, as the training driver does, then train."""
    state = ParallelState()
    model = get_registry("data_parallel").get("ddp")(_model(), state, config)
    opt = get_registry("optimizer").get(config.optimizer.optimizer)(model, state, config)
    rows = GLOBAL_BATCH // world_size
    norms = []
    for step in range(STEPS):
        x, y = (t[rank * rows : (rank + 1) * rows] for t in _batch(step))
        opt.zero_grad()
        micro = zip(x.chunk(microbatches), y.chunk(microbatches), strict=True)
        for i, (xm, ym) in enumerate(micro):
            last = i == microbatches - 1
            with nullcontext() if last else model.no_sync():
                (F.mse_loss(model(xm), ym) / microbatches).backward()
        skipped, norm = opt.step()
        assert not skipped
        norms.append(norm)
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "norms": norms,
        "optimizer": type(opt).__name__,
        "param_groups": len(opt.param_groups),
        "main_elements": sum(t.numel() for g in opt.param_groups for t in g["params"]),
    }


VARIANTS = {
    "ddp": (2, {}, {}, 1),
    "accumulate_2_microbatches": (2, {}, {}, 2),
    "average_in_collective": (2, {"average_in_collective": True}, {}, 1),
    "no_overlap": (2, {"overlap_grad_reduce": False}, {}, 1),
    "one_bucket": (2, {"bucket_size_mb": 25.0}, {}, 1),
    "cpu_offload_half": (
        2,
        {},
        {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5},
        1,
    ),
    "sgd_clipped": (2, {}, {"optimizer": "sgd", "clip_grad": 0.3}, 1),
    "distributed_optimizer": (2, {}, {"use_distributed_optimizer": True}, 1),
    "distributed_optimizer_fp32_reduce_scatter": (
        2,
        {"reduce_scatter_with_fp32_accumulation": True},
        {"use_distributed_optimizer": True},
        1,
    ),
    "distributed_optimizer_cpu_offload": (
        2,
        {"average_in_collective": True},
        {
            "use_distributed_optimizer": True,
            "optimizer_cpu_offload": True,
            "optimizer_offload_fraction": 0.5,
        },
        1,
    ),
    "distributed_optimizer_4_ranks": (4, {}, {"use_distributed_optimizer": True}, 2),
    "distributed_optimizer_4_ranks_fp32_reduce_scatter": (
        4,
        {"reduce_scatter_with_fp32_accumulation": True, "average_in_collective": True},
        {"use_distributed_optimizer": True, "clip_grad": 0.3},
        1,
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_data_parallel_training_equals_one_process(variant: str) -> None:
    world_size, ddp_fields, optimizer_fields, microbatches = VARIANTS[variant]
    ddp = DDPConfig(**{"bucket_size_mb": TINY_BUCKETS_MB, **ddp_fields})
    config = _config(ddp, **{"clip_grad": 0.0, **optimizer_fields})
    want_params, want_norms = _reference(config.optimizer.optimizer, config.optimizer.clip_grad)

    results = run_ranks(_train, world_size, config, microbatches, backend="gloo")

    distributed = config.optimizer.use_distributed_optimizer
    total = sum(p.numel() for p in want_params.values())
    for rank, got in enumerate(results):
        want_type = "DistributedOptimizer" if distributed else "MixedPrecisionOptimizer"
        assert got["optimizer"] == want_type
        for name, want in want_params.items():
            torch.testing.assert_close(
                got["params"][name], want, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}"
            )
        torch.testing.assert_close(got["norms"], want_norms, rtol=1e-5, atol=0)
        if distributed:  # each rank keeps fp32 weights (and Adam state) for its shard only
            assert got["main_elements"] < total
    if distributed:
        assert sum(got["main_elements"] for got in results) == total
    if config.optimizer.optimizer_cpu_offload:  # decay/no-decay groups on the device and on CPU
        assert results[0]["param_groups"] == 4


def _hook_and_launch_order(rank: int, world_size: int, overlap: bool) -> list[tuple[str, str]]:
    """Backward once, recording each parameter's gradient hook and each bucket all-reduce."""
    events: list[tuple[str, str]] = []
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        events.append(("all_reduce", str(tensor.numel())))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce  # this forked rank's own copy of the module
    model = DistributedDataParallel(
        _model(), ParallelState(), bucket_size_mb=TINY_BUCKETS_MB, overlap_grad_reduce=overlap
    )
    for name, p in model.module.named_parameters():  # registered after DDP's: they run after
        p.register_post_accumulate_grad_hook(lambda _, name=name: events.append(("grad", name)))
    x, y = _batch(0)
    F.mse_loss(model(x), y).backward()
    events.append(("backward", "done"))
    model.finish_grad_sync()
    return events


@pytest.mark.parametrize("overlap", [True, False])
def test_bucket_all_reduce_starts_during_backward(overlap: bool) -> None:
    events = run_ranks(_hook_and_launch_order, 2, overlap, backend="gloo")[0]
    launches = [i for i, (kind, _) in enumerate(events) if kind == "all_reduce"]
    assert len(launches) == 3  # one per bucket
    first_layer_grad = events.index(("grad", "0.weight"))  # the last gradient backward computes
    backward_done = events.index(("backward", "done"))
    if overlap:
        # The last layers' bucket is already being reduced while backward reaches the first.
        assert launches[0] < first_layer_grad
        assert launches[-1] < backward_done
    else:
        assert launches[0] > backward_done


def test_gradients_accumulate_only_under_no_sync() -> None:
    model = DistributedDataParallel(_model(), ParallelState())
    x, y = _batch(0)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        F.mse_loss(model(x), y).backward()  # a second backward outside no_sync()


def test_gradients_live_in_main_grad_views_of_one_flat_buffer() -> None:
    model = DistributedDataParallel(_model(), ParallelState(), bucket_size_mb=TINY_BUCKETS_MB)
    x, y = _batch(0)
    F.mse_loss(model(x), y).backward()
    model.finish_grad_sync()
    (buffer,) = model.grad_buffers
    reference = _model()
    F.mse_loss(reference(x), y).backward()
    for (name, p), (_, want) in zip(
        model.module.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert p.grad is None, name
        assert p.main_grad.untyped_storage().data_ptr() == buffer.grad_data.data_ptr()
        torch.testing.assert_close(p.main_grad, want.grad)
    # Reverse order: the output layer's gradients open the buffer, the first layer's close it.
    assert model.buckets[0].params[0] is model.module[5].bias
    assert buffer.params[-1] is model.module[0].weight


def test_distributed_optimizer_needs_a_sharding_ddp() -> None:
    state = ParallelState()
    config = _config(DDPConfig(), use_distributed_optimizer=True)
    model = DistributedDataParallel(_model(), state)
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        DistributedOptimizer(model, state, lambda groups: torch.optim.AdamW(groups))
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        get_registry("optimizer").get("adam")(model, state, config)
    with pytest.raises(ValueError, match="reduce_scatter_with_fp32_accumulation"):
        DistributedDataParallel(_model(), state, reduce_scatter_with_fp32_accumulation=True)
    wrapped = get_registry("data_parallel").get("ddp")(_model(), state, config)
    opt = get_registry("optimizer").get("adam")(wrapped, state, config)
    assert isinstance(opt, DistributedOptimizer) and isinstance(opt, MixedPrecisionOptimizer)
