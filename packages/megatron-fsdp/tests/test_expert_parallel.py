"""Experts sharded over an expert-data-parallel sub-mesh, the rest over the full mesh.

DeepSeek-V3-style training on 4 ranks: expert parallelism 2 splits each block's experts across
rank pairs ``{0,1}`` and ``{2,3}``, so each expert exists on the two ranks of its
expert-data-parallel group (``{0,2}`` or ``{1,3}``) and is sharded over that sub-mesh, while
attention, norms, embedding and head are sharded over all 4 ranks. The oracle holds every
expert on every rank and averages all gradients over 4 ranks; both clip the global gradient
norm, which must count each expert once although no single mesh holds them all.
"""

from __future__ import annotations

import torch
from fsdp_testing import (
    adamw,
    build,
    expert_parallel_copy,
    reference_losses,
    run_ranks,
    shard,
    train,
)
from torch.distributed.device_mesh import init_device_mesh

import megatron_fsdp
from megatron_fsdp import SHARDING_STRATEGIES

STEPS, EXPERTS, CLIP = 20, 4, 0.5


def _train_expert_parallel(rank: int, world: int) -> tuple:
    reference = reference_losses(rank, world, STEPS, clip_norm=CLIP, num_experts=EXPERTS)
    dense_mesh = init_device_mesh("cpu", (world,))
    expert_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("edp", "ep"))
    out = {}
    for strategy in SHARDING_STRATEGIES:
        model = expert_parallel_copy(build(num_experts=EXPERTS), expert_mesh.get_group("ep"))
        # Each expert already summed the gradients of its expert-parallel peers' tokens, so it
        # divides by the full data-parallel size (4), not by its sub-mesh's (2).
        shard(model, dense_mesh, strategy, expert_mesh=expert_mesh["edp"], dp_size=world)
        optimizer = adamw(model)
        norms = []

        def clip(model=model, norms=norms) -> None:
            norms.append(megatron_fsdp.clip_grad_norm_(model, CLIP).item())

        losses = train(model, optimizer, rank, world, STEPS, before_step=clip)
        meshes = {
            ("experts" if ".experts." in name else "dense", p.device_mesh.size())
            for name, p in model.named_parameters()
        }
        out[strategy] = (losses, norms, meshes)
    return reference, out


def test_experts_on_a_sub_mesh_train_like_data_parallel_with_clipping() -> None:
    ranks = run_ranks(_train_expert_parallel, 4)
    reference, out = ranks[0]
    for strategy, (losses, norms, meshes) in out.items():
        assert meshes == {("dense", 4), ("experts", 2)}
        assert max(norms) > CLIP  # clipping was active
        assert all(r[1][strategy][1] == norms for r in ranks)  # every rank saw the same norm
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6,
            msg=lambda m, s=strategy: f"{s}: {m}",
        )  # fmt: skip
