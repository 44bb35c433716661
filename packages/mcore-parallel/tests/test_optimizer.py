"""Optimizers: the global grad norm under tensor parallelism equals one process's, bf16 and fp16
mixed precision keep fp32 main weights, the fp16 loss scaler skips overflowing steps, the
fp32-accumulating reduce-scatter sums in fp32, and the learning-rate schedules follow
Megatron's formulas."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.core import Config, PluginManager
from mcore.core.sections import OptimizerConfig, TrainConfig
from mcore.core.testing import run_ranks
from mcore.parallel import (
    ColumnParallelLinear,
    DistributedDataParallel,
    DynamicLossScaler,
    MixedPrecisionOptimizer,
    OptimizerParamScheduler,
    ParallelState,
    RowParallelLinear,
    build_lr_scheduler,
    mark_tp_partial_grad,
)
from mcore.parallel.optimizer import build_adam, build_sgd

TINY_BUCKETS_MB = 200 / 2**20

# -- tensor parallelism: dp2 x tp2 on four ranks -----------------------------------------------

S, B, H_IN, H_MID, H_OUT = 4, 4, 8, 16, 8  # sequence-first activations [s, b, h]; B is global
TP_STEPS, TP_LR, TP_WEIGHT_DECAY, TP_CLIP = 3, 0.1, 0.1, 0.05


class _Block(nn.Module):
    """Column-parallel, row-parallel, then a replicated LayerNorm; plain linears at TP 1."""

    def __init__(self, tp_group: dist.ProcessGroup | None, sequence_parallel: bool) -> None:
        super().__init__()
        sp = sequence_parallel
        self.fc1 = ColumnParallelLinear(H_IN, H_MID, tp_group=tp_group, sequence_parallel=sp)
        self.fc2 = RowParallelLinear(H_MID, H_OUT, tp_group=tp_group, sequence_parallel=sp)
        self.norm = nn.LayerNorm(H_OUT)
        if sp and tp_group is not None:  # each TP rank normalises only its sequence chunk
            mark_tp_partial_grad(*self.norm.parameters())
        full = _full_weights()
        with torch.no_grad():
            self.fc1.weight.copy_(self.fc1.shard_weight(full["fc1.weight"]))
            self.fc1.bias.copy_(self.fc1.shard_bias(full["fc1.bias"]))
            self.fc2.weight.copy_(self.fc2.shard_weight(full["fc2.weight"]))
            self.fc2.bias.copy_(full["fc2.bias"])
            self.norm.weight.copy_(full["norm.weight"])
            self.norm.bias.copy_(full["norm.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.tanh(self.fc1(x))))


def _full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "fc1.weight": torch.randn(H_MID, H_IN, generator=g) * 0.5,
        "fc1.bias": torch.randn(H_MID, generator=g) * 0.1,
        "fc2.weight": torch.randn(H_OUT, H_MID, generator=g) * 0.3,
        "fc2.bias": torch.randn(H_OUT, generator=g) * 0.1,
        "norm.weight": 1 + 0.1 * torch.randn(H_OUT, generator=g),
        "norm.bias": 0.1 * torch.randn(H_OUT, generator=g),
    }


def _tp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(S, B, H_IN, generator=g), torch.randn(S, B, H_OUT, generator=g)


def _sgd_config(distributed: bool) -> Config:
    optimizer = OptimizerConfig(
        optimizer="sgd",
        lr=TP_LR,
        weight_decay=TP_WEIGHT_DECAY,
        clip_grad=TP_CLIP,
        use_distributed_optimizer=distributed,
    )
    return Config({"train": TrainConfig(), "optimizer": optimizer})


def _tp_reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    model = _Block(None, sequence_parallel=False)
    params = list(model.named_parameters())
    groups = [
        {"params": [p for _, p in params if p.ndim > 1], "weight_decay": TP_WEIGHT_DECAY},
        {"params": [p for _, p in params if p.ndim == 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, lr=TP_LR, momentum=0.9)
    norms = []
    for step in range(TP_STEPS):
        x, y = _tp_batch(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), TP_CLIP)))
        opt.step()
    return model.state_dict(), norms


def _train_tp(rank: int, world_size: int) -> dict:
    state = ParallelState(tp=2)
    rows = B // state.dp_size
    dp_rows = slice(state.dp_rank * rows, (state.dp_rank + 1) * rows)  # this replica's batch
    results: dict = {"tp_rank": state.tp_rank}
    for sp in (False, True):
        for distributed in (False, True):
            config = _sgd_config(distributed)
            model = DistributedDataParallel(
                _Block(state.tp_group, sp),
                state,
                bucket_size_mb=TINY_BUCKETS_MB,
                use_distributed_optimizer=distributed,
            )
            opt = build_sgd(model, state, config)
            norms = []
            for step in range(TP_STEPS):
                x, y = (t[:, dp_rows] for t in _tp_batch(step))
                opt.zero_grad()
                if sp:  # this TP rank's sequence chunk; the chunks' losses sum to the mean
                    x, y = x.chunk(2)[state.tp_rank], y.chunk(2)[state.tp_rank]
                    loss = (model(x) - y).pow(2).sum() / (S * rows * H_OUT)
                else:
                    loss = F.mse_loss(model(x), y)
                loss.backward()
                skipped, norm = opt.step()
                assert not skipped
                norms.append(norm)
            params = {k: v.clone() for k, v in model.state_dict().items()}
            results[sp, distributed] = {"params": params, "norms": norms}
    return results


def test_grad_norm_and_clipping_under_tensor_parallelism_equal_one_process() -> None:
    want_params, want_norms = _tp_reference()

    results = run_ranks(_train_tp, 4, backend="gloo")

    def shard(name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        dim = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}.get(name)
        return full if dim is None else full.chunk(2, dim=dim)[tp_rank]  # others are replicated

    for rank, result in enumerate(results):
        for (sp, distributed), got in ((k, v) for k, v in result.items() if k != "tp_rank"):
            what = f"rank {rank} sequence_parallel={sp} distributed_optimizer={distributed}"
            torch.testing.assert_close(got["norms"], want_norms, rtol=1e-5, atol=0, msg=what)
            for name, want in want_params.items():
                torch.testing.assert_close(
                    got["params"][name],
                    shard(name, want, result["tp_rank"]),
                    rtol=1e-5,
                    atol=1e-6,
                    msg=f"{what}: {name}",
                )


# -- mixed precision ---------------------------------------------------------------------------

IN, HIDDEN, OUT, BATCH = 8, 16, 4, 8


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def _fixed_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)
    return x.to(dtype), y.to(dtype)


def _train_bf16(rank: int, world_size: int, distributed: bool) -> dict:
    state = ParallelState()
    config = Config(
        {
            "train": TrainConfig(bf16=True),
            "optimizer": OptimizerConfig(lr=1e-2, use_distributed_optimizer=distributed),
        }
    )
    model = DistributedDataParallel(
        _mlp().to(torch.bfloat16),
        state,
        bucket_size_mb=TINY_BUCKETS_MB,
        grad_reduce_in_fp32=not distributed,  # bf16 gradients, summed in fp32 by the all-to-all
        use_distributed_optimizer=distributed,
        reduce_scatter_with_fp32_accumulation=distributed,
    )
    opt = build_adam(model, state, config)
    rows = BATCH // world_size
    x, y = (t[rank * rows : (rank + 1) * rows] for t in _fixed_batch(torch.bfloat16))
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.mse_loss(model(x).float(), y.float())  # the fp32 upcast lives in the loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "main_dtypes": {t.dtype for g in opt.param_groups for t in g["params"]},
        "grad_dtypes": {b.grad_dtype for b in model.grad_buffers},
        "params": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("distributed", [False, True], ids=["ddp", "distributed_optimizer"])
def test_bf16_trains_with_fp32_main_weights(distributed: bool) -> None:
    results = run_ranks(_train_bf16, 2, distributed, backend="gloo")
    for got in results:
        assert got["losses"][-1] < 0.8 * got["losses"][0], got["losses"]
        assert got["main_dtypes"] == {torch.float32}
        assert got["grad_dtypes"] == {torch.bfloat16 if distributed else torch.float32}
        assert all(p.dtype == torch.bfloat16 for p in got["params"].values())
    for name, p in results[0]["params"].items():  # the replicas stay identical
        assert torch.equal(p, results[1]["params"][name]), name


def _fp32_accumulated_shards(rank: int, world_size: int) -> None:
    state = ParallelState()
    model = _mlp().to(torch.bfloat16)
    plain = copy.deepcopy(model)
    ddp = DistributedDataParallel(
        model,
        state,
        bucket_size_mb=TINY_BUCKETS_MB,
        use_distributed_optimizer=True,
        reduce_scatter_with_fp32_accumulation=True,
    )
    rows = BATCH // world_size
    x, y = (t[rank * rows : (rank + 1) * rows] for t in _fixed_batch(torch.bfloat16))
    F.mse_loss(ddp(x), y).backward()
    ddp.finish_grad_sync()
    F.mse_loss(plain(x), y).backward()
    # What the shards must hold: every rank's bf16 gradient / dp, summed in fp32, rounded once.
    (buffer,) = ddp.grad_buffers
    want = torch.zeros(buffer.numel, dtype=torch.float32)
    for p, local in zip(model.parameters(), plain.parameters(), strict=True):
        start, end = buffer.range_of(p)
        want[start:end] = (local.grad / world_size).float().reshape(-1)
    dist.all_reduce(want)
    for bucket in ddp.buckets:
        start, end = bucket.shard_range(state.dp_cp_rank, world_size)
        assert torch.equal(buffer.grad_data[start:end], want[start:end].bfloat16())


def test_reduce_scatter_with_fp32_accumulation_sums_bf16_gradients_in_fp32() -> None:
    run_ranks(_fp32_accumulated_shards, 2, backend="gloo")


def test_fp16_loss_scaler_skips_overflowing_steps_and_backs_off() -> None:
    model = _mlp().half()
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=2, hysteresis=1)
    opt = MixedPrecisionOptimizer(
        model, ParallelState(), lambda groups: torch.optim.SGD(groups, lr=0.1), loss_scaler=scaler
    )
    x, y = _fixed_batch(torch.float16)

    def backward() -> float:
        opt.zero_grad()
        opt.scale_loss(F.mse_loss(model(x).float(), y.float())).backward()
        grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters()])
        return float(grads.norm()) / scaler.scale  # the true (unscaled) gradient norm

    want_norm = backward()
    skipped, norm = opt.step()
    assert not skipped and norm == pytest.approx(want_norm, rel=1e-4)
    assert scaler.scale == 1024.0
    assert {t.dtype for g in opt.param_groups for t in g["params"]} == {torch.float32}

    before = [p.clone() for p in model.parameters()]
    backward()
    model[0].weight.grad[0, 0] = math.inf  # an overflow in backward
    skipped, norm = opt.step()
    assert skipped and not math.isfinite(norm)
    assert scaler.scale == 512.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))

    for _ in range(2):  # two clean steps: the scale grows back
        backward()
        skipped, _ = opt.step()
        assert not skipped
    assert scaler.scale == 1024.0
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_hysteresis_waits_for_consecutive_overflows() -> None:
    scaler = DynamicLossScaler(initial_scale=8.0, hysteresis=2, growth_interval=100)
    scaler.update(found_inf=True)
    assert scaler.scale == 8.0
    scaler.update(found_inf=True)
    assert scaler.scale == 4.0


def test_bf16_state_dict_round_trip_with_cpu_offload() -> None:
    x, y = _fixed_batch(torch.bfloat16)

    def build(model: nn.Module) -> MixedPrecisionOptimizer:
        return MixedPrecisionOptimizer(
            model,
            ParallelState(),
            lambda groups: torch.optim.AdamW(groups, lr=1e-2),
            offload_fraction=0.5,
        )

    def train_step(model: nn.Module, opt: MixedPrecisionOptimizer) -> None:
        opt.zero_grad()
        F.mse_loss(model(x).float(), y.float()).backward()
        opt.step()

    model = _mlp().bfloat16()
    opt = build(model)
    train_step(model, opt)
    resumed = copy.deepcopy(model)
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and loaded
    for m, o in ((model, opt), (resumed, resumed_opt)):
        train_step(m, o)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


# -- learning-rate schedules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 200: 1.0}),
        ("linear", {5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1, 101: 0.1}),
        ("cosine", {10: 1.0, 40: 0.775, 55: 0.55, 100: 0.1, 150: 0.1}),
        ("WSD", {10: 1.0, 80: 1.0, 90: 0.1 + 0.9 * (2 * 0.5**0.5 - 1), 100: 0.1, 120: 0.1}),
    ],
)
def test_lr_schedule_values(style: str, expected: dict[int, float]) -> None:
    optimizer = SimpleNamespace(param_groups=[{}, {}])
    scheduler = OptimizerParamScheduler(
        optimizer,
        max_lr=1.0,
        min_lr=0.1,
        warmup_iters=10,
        decay_iters=100,
        decay_style=style,
        wsd_decay_iters=20,
    )
    for step, lr in expected.items():
        assert scheduler.get_lr(step) == pytest.approx(lr), step
    assert scheduler.step(5) == pytest.approx(0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.5)] * 2


def test_lr_scheduler_from_config_sets_every_param_group() -> None:
    config = Config(
        {
            "train": TrainConfig(train_iters=12),
            "optimizer": OptimizerConfig(
                lr=3e-4, min_lr=3e-5, lr_warmup_iters=2, lr_decay_style="linear"
            ),
        }
    )
    opt = build_adam(_mlp(), ParallelState(), config)
    scheduler = build_lr_scheduler(opt, config)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # step 0 of the warmup
    scheduler.step(7)  # halfway through the decay: iterations 2..12
    assert all(g["lr"] == pytest.approx(3e-5 + 0.5 * 2.7e-4) for g in opt.param_groups)
    scheduler.step(100)
    assert all(g["lr"] == pytest.approx(3e-5) for g in opt.param_groups)
    with pytest.raises(ValueError, match="warmup_iters < decay_iters"):
        OptimizerParamScheduler(opt, max_lr=1.0, warmup_iters=12, decay_iters=12)


def test_biases_and_norm_weights_are_not_weight_decayed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    config = Config({"train": TrainConfig(), "optimizer": OptimizerConfig(weight_decay=0.1)})
    opt = build_adam(model, ParallelState(), config)
    decayed, not_decayed = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    # fp32 parameters are their own main weights: the optimizer steps flat views of them.
    (weight,) = decayed["params"]
    assert weight.data_ptr() == model[0].weight.data_ptr() and weight.numel() == 16
    assert len(not_decayed["params"]) == 3  # linear bias, norm weight, norm bias


def test_plugin_registers_ddp_and_optimizers_lazily() -> None:
    manager = PluginManager().load_entry_points(only=["mcore-parallel"])
    components = manager.components_of("mcore-parallel")
    assert components["data_parallel"] == ["ddp"]
    assert components["optimizer"] == ["adam", "sgd"]
    assert "ddp" in components["config_section"]


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "for_loop"])
def test_optimizer_impl_picks_the_torch_kernels_and_gives_the_same_steps(impl: str) -> None:
    """optimizer.optimizer_impl: fused (auto on CPU), foreach or for_loop, the same updates."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    x = torch.randn(5, 8)
    results = {}
    for choice in ("for_loop", impl):
        model = copy.deepcopy(reference)
        config = Config({"train": TrainConfig(),
                         "optimizer": OptimizerConfig(optimizer_impl=choice, lr=1e-2)})  # fmt: skip
        opt = build_adam(model, ParallelState(), config)
        (inner,) = opt._optimizers
        results[choice] = inner.defaults
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        results[choice, "weights"] = [p.detach().clone() for p in model.parameters()]
    expected = {"auto": (True, False), "fused": (True, False), "foreach": (False, True),
                "for_loop": (False, False)}[impl]  # fmt: skip
    assert (bool(results[impl]["fused"]), bool(results[impl]["foreach"])) == expected
    for ours, theirs in zip(results[impl, "weights"], results["for_loop", "weights"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _refuses_fused_dtensors(rank: int, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mcore.core import McoreError
    from mcore.parallel.optimizer.build import implementation

    mesh = init_device_mesh("cpu", (world,))
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
    assert implementation(model, "auto") == {"fused": False, "foreach": True}
    try:
        implementation(model, "fused")
    except McoreError as exc:
        return str(exc)
    return ""


def test_fused_is_refused_for_sharded_dtensor_parameters() -> None:
    (message,) = run_ranks(_refuses_fused_dtensors, 1, backend="gloo")
    assert "optimizer.optimizer_impl = 'fused' needs plain CPU or CUDA parameters" in message


def test_a_parameter_without_a_gradient_counts_as_zero_in_the_grad_norm() -> None:
    # Regression: without DDP's buffers (a plain or megatron_fsdp-wrapped model) a trainable
    # parameter that the forward did not use has no gradient, and the norm used to fail on it.
    torch.manual_seed(0)
    used, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.ModuleDict({"used": used, "unused": unused})
    optimizer = MixedPrecisionOptimizer(
        model, ParallelState(), lambda groups: torch.optim.SGD(groups, lr=0.1)
    )
    used(torch.randn(2, 4)).sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in used.parameters()])
    before = unused.weight.detach().clone()
    skipped, grad_norm = optimizer.step()
    assert not skipped and grad_norm == pytest.approx(float(expected))
    assert torch.equal(unused.weight, before)
