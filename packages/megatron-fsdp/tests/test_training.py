"""Training under ``fully_shard`` equals plain fp32 data parallelism, step for step.

Each test trains the tiny transformer of ``fsdp_testing`` on real gloo ranks and compares the
global loss of every step with the oracle (every rank holding the whole model, gradients
all-reduced and averaged, as DDP does) on the same data.
"""

from __future__ import annotations

import pytest
import torch
from fsdp_testing import adamw, build, reference_losses, run_ranks, shard, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import megatron_fsdp
from megatron_fsdp import SHARDING_STRATEGIES, MixedPrecisionPolicy, OffloadPolicy

STEPS = 20


def _close(actual: list[float], expected: list[float], what: str, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(
        torch.tensor(actual),
        torch.tensor(expected),
        rtol=rtol,
        atol=1e-6,
        msg=lambda m: f"{what}: {m}",
    )


def _every_strategy(rank: int, world: int, mesh_shape: tuple[int, ...]) -> tuple:
    reference = reference_losses(rank, world, STEPS)
    mesh = init_device_mesh("cpu", mesh_shape)
    losses = {}
    for strategy in SHARDING_STRATEGIES:
        model = shard(build(), mesh, strategy)
        losses[strategy] = train(model, adamw(model), rank, world, STEPS)
    return reference, losses


@pytest.mark.parametrize(
    "world, mesh_shape",
    [(2, (2,)), (4, (4,)), (4, (2, 2))],
    ids=["2-ranks", "4-ranks", "hybrid-2x2"],
)
def test_every_strategy_matches_data_parallel(world: int, mesh_shape: tuple[int, ...]) -> None:
    reference, losses = run_ranks(_every_strategy, world, mesh_shape)[0]
    assert reference[-1] < reference[0] - 0.5  # it learns, so equal losses mean something
    for strategy, got in losses.items():
        _close(got, reference, strategy)


def _parameters_and_grads(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (2, world // 2))
    found = {}
    for strategy in ("no_shard", "optim_grads_params"):
        model = shard(build(), mesh, strategy)
        # The same names as the plain model: checkpoints and optimizers see nothing new.
        assert [n for n, _ in model.named_parameters()] == [
            n for n, _ in build().named_parameters()
        ]
        assert list(model.state_dict()) == list(build().state_dict())
        model(torch.randint(0, 61, (2, 8))).sum().backward()
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name
            assert p.grad.placements == p.placements
            assert p.to_local().shape == p.grad.to_local().shape
        found[strategy] = {p.placements for p in model.parameters()}
    return found


def test_parameters_and_gradients_are_dtensors_between_steps() -> None:
    found = run_ranks(_parameters_and_grads, 4)[0]
    assert found["optim_grads_params"] == {(Replicate(), Shard(0))}
    assert found["no_shard"] == {(Replicate(), Replicate())}


def _accumulation(rank: int, world: int) -> tuple:
    reference = reference_losses(rank, world, 8)
    mesh = init_device_mesh("cpu", (world,))
    losses = {}
    for strategy in SHARDING_STRATEGIES:
        model = shard(build(), mesh, strategy)
        losses[strategy] = train(model, adamw(model), rank, world, 8, microbatches=2)
    return reference, losses


def test_micro_batches_under_no_sync_sum_to_the_full_batch_gradient() -> None:
    reference, losses = run_ranks(_accumulation, 2)[0]
    for strategy, got in losses.items():
        _close(got, reference, strategy)


def _recompute(rank: int, world: int) -> tuple:
    reference = reference_losses(rank, world, 6)
    mesh = init_device_mesh("cpu", (world,))
    losses = {}
    for recompute in ("block", "stack"):
        for strategy in ("optim_grads", "optim_grads_params"):
            model = shard(build(recompute=recompute), mesh, strategy)
            losses[recompute, strategy] = train(model, adamw(model), rank, world, 6)
    return reference, losses


def test_activation_recompute_finds_the_parameters_gathered() -> None:
    reference, losses = run_ranks(_recompute, 2)[0]
    for what, got in losses.items():
        _close(got, reference, str(what))


def _mixed_precision(rank: int, world: int) -> tuple:
    reference = reference_losses(rank, world, 10)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for reduce_dtype in (torch.float32, None):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        model = shard(build(), mesh, "optim_grads_params", mp_policy=policy)
        seen: list[tuple[torch.dtype, torch.dtype]] = []

        def record(module, args, seen=seen) -> None:
            seen.append((module.weight.dtype, args[0].dtype))

        model.blocks[0].qkv.register_forward_pre_hook(record)
        losses = train(model, adamw(model), rank, world, 10, microbatches=2)
        model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
        dtypes = {(p.dtype, p.grad.dtype) for p in model.parameters()}
        out[str(reduce_dtype)] = (losses, seen[0], dtypes)
    return reference, out


def test_bf16_compute_keeps_fp32_main_weights_and_gradients() -> None:
    reference, out = run_ranks(_mixed_precision, 2)[0]
    for what, (losses, seen, dtypes) in out.items():
        assert seen == (torch.bfloat16, torch.bfloat16), what
        assert dtypes == {(torch.float32, torch.float32)}, what
        _close(losses, reference, f"bf16 compute, reduce in {what}", rtol=2e-2)


def _offload(rank: int, world: int) -> tuple:
    reference = reference_losses(rank, world, 6)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for strategy in ("optim", "optim_grads_params"):
        model = shard(build(), mesh, strategy, offload_policy=OffloadPolicy())
        optimizer = adamw(model)
        losses = train(model, optimizer, rank, world, 6)
        devices = {v.to_local().device.type for s in optimizer.state.values() for v in s.values()
                   if isinstance(v, DTensor)}  # fmt: skip
        out[strategy] = (losses, devices)
    return reference, out


def test_optimizer_state_offloaded_to_cpu_trains_the_same() -> None:
    reference, out = run_ranks(_offload, 2)[0]
    for strategy, (losses, devices) in out.items():
        assert devices == {"cpu"}
        _close(losses, reference, strategy)


def _memory(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    full = sum(p.numel() * p.element_size() for p in build().parameters())
    out = {"full": full}
    for strategy in ("no_shard", "optim_grads_params"):
        model = shard(build(), mesh, strategy)
        optimizer = adamw(model)
        train(model, optimizer, rank, world, 1)
        out[strategy] = megatron_fsdp.memory_footprint(model, optimizer)
    return out


def test_optim_grads_params_memory_falls_as_one_over_n() -> None:
    per_world = {world: run_ranks(_memory, world) for world in (2, 4)}
    for world, ranks in per_world.items():
        for out in ranks:
            # main weights + gradients + AdamW's two moments, each the size of the model
            model_state = 4 * out["full"]
            sharded = out["optim_grads_params"]
            assert sharded.params_grads_optimizer == pytest.approx(model_state / world, rel=0.05)
            assert sharded.unsharded_params == 0 and sharded.grad_accumulators == 0
            replicated = out["no_shard"]
            assert replicated.params_grads_optimizer == pytest.approx(model_state, rel=0.05)
    ratio = (per_world[4][0]["optim_grads_params"].params_grads_optimizer
             / per_world[2][0]["optim_grads_params"].params_grads_optimizer)  # fmt: skip
    assert ratio == pytest.approx(0.5, rel=0.05)


def test_an_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match="'no_shard', 'optim', 'optim_grads', 'optim_grads_params'"
    ):
        megatron_fsdp.fully_shard(torch.nn.Linear(2, 2), sharding_strategy="zero3")


def test_a_container_without_forward_is_refused() -> None:
    with pytest.raises(ValueError, match="has no forward"):
        megatron_fsdp.fully_shard(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))


def _from_meta(rank: int, world: int) -> tuple:
    reference = reference_losses(rank, world, STEPS)
    full = build().state_dict()  # the weights every rank would build
    mesh = init_device_mesh("cpu", (world,))
    losses, pending = {}, {}
    for strategy in SHARDING_STRATEGIES:
        with torch.device("meta"):
            model = build()
        model = shard(model, mesh, strategy)
        pending[strategy] = all(p.init_pending for p in model.parameters())
        # Each rank fills only its own rows of each weight, as a meta-built model's owner does.
        with torch.no_grad():
            for name, p in model.named_parameters():
                (chunk,) = p.__create_chunk_list__()
                rows = slice(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0])
                p.to_local().view(tuple(chunk.sizes)).copy_(full[name][rows])
                p.init_pending = False
        losses[strategy] = train(model, adamw(model), rank, world, STEPS)
    return reference, losses, pending


def test_a_meta_model_is_sharded_without_materialising_it_and_trains_the_same() -> None:
    reference, losses, pending = run_ranks(_from_meta, 2)[0]
    assert all(pending.values())  # shards of meta parameters are flagged until filled
    for strategy, got in losses.items():
        _close(got, reference, f"{strategy} from meta")
