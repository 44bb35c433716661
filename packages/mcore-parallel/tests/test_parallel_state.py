"""ParallelState builds every group from one device mesh: memberships, ranks and errors."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from mcore.core import McoreError
from mcore.core.testing import run_ranks
from mcore.parallel import (
    DistributedNotInitializedError,
    ParallelConfig,
    ParallelLayoutError,
    ParallelState,
)

DIMS = ("tp", "pp", "dp", "cp", "dp_cp", "ep", "etp", "edp")


def test_a_single_process_state_has_sizes_one_and_no_groups() -> None:
    state = ParallelState()
    assert (state.world_size, state.rank, state.mesh, state.expert_mesh) == (1, 0, None, None)
    for dim in DIMS:
        assert getattr(state, f"{dim}_size") == 1
        assert getattr(state, f"{dim}_rank") == 0
        assert getattr(state, f"{dim}_group") is None
    assert state.is_first_pp_stage and state.is_last_pp_stage
    # Everything divides by one.
    state.check_divisible(num_attention_heads=7, num_query_groups=7, vocab_size=51, num_experts=3)
    assert ParallelState.from_config(ParallelConfig()).tp_size == 1


def test_bad_sizes_and_a_missing_process_group_are_reported() -> None:
    with pytest.raises(ParallelLayoutError, match=r"tensor_model_parallel_size must be .*got 0"):
        ParallelState(tp=0)
    with pytest.raises(ParallelLayoutError, match=r"expert_tensor_parallel_size .* got -1"):
        ParallelState(etp=-1)
    with pytest.raises(DistributedNotInitializedError) as info:
        ParallelState(tp=2, cp=2)
    message = str(info.value)
    assert "tensor_model_parallel_size=2, context_parallel_size=2" in message
    assert "init_process_group" in message and "torchrun" in message and "run_ranks" in message
    assert isinstance(info.value, McoreError)


# Layouts on 4 ranks and the groups each must produce (every group listed; a dimension of
# size 1 gives singletons). Dense ranks are pp-major, tp fastest; expert ranks etp fastest.
SINGLES = [[0], [1], [2], [3]]
ALL = [[0, 1, 2, 3]]
LAYOUTS = {
    "tp2 x dp2": (
        {"tp": 2},
        {
            "tp": [[0, 1], [2, 3]],
            "dp": [[0, 2], [1, 3]],
            "pp": SINGLES,
            "cp": SINGLES,
            "dp_cp": [[0, 2], [1, 3]],
            "ep": SINGLES,
            "etp": [[0, 1], [2, 3]],  # defaults to tp
            "edp": [[0, 2], [1, 3]],
        },
    ),
    "tp2 x pp2": (
        {"tp": 2, "pp": 2},
        {
            "tp": [[0, 1], [2, 3]],
            "pp": [[0, 2], [1, 3]],
            "dp": SINGLES,
            "cp": SINGLES,
            "dp_cp": SINGLES,
            "edp": SINGLES,
        },
    ),
    "cp2 x tp2": (
        {"tp": 2, "cp": 2},
        {
            "tp": [[0, 1], [2, 3]],
            "cp": [[0, 2], [1, 3]],
            "dp": SINGLES,
            "dp_cp": [[0, 2], [1, 3]],
            "edp": [[0, 2], [1, 3]],
        },
    ),
    "dp2 x cp2": (
        {"cp": 2},
        {"cp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "dp_cp": ALL, "tp": SINGLES},
    ),
    "tp2, ep2 etp1": (
        {"tp": 2, "ep": 2, "etp": 1},
        {
            "tp": [[0, 1], [2, 3]],
            "dp": [[0, 2], [1, 3]],
            "ep": [[0, 1], [2, 3]],
            "etp": SINGLES,
            "edp": [[0, 2], [1, 3]],
        },
    ),
    "tp2, ep2 etp2": (
        {"tp": 2, "ep": 2},
        {"ep": [[0, 2], [1, 3]], "etp": [[0, 1], [2, 3]], "edp": SINGLES},
    ),
}


def _describe_layouts(rank: int, world_size: int) -> dict:
    """Each layout's (size, rank, group members) per dimension, and the errors raised."""
    out: dict = {}
    for name, (sizes, _) in LAYOUTS.items():
        state = ParallelState(**sizes)
        out[name] = {
            dim: (
                getattr(state, f"{dim}_size"),
                getattr(state, f"{dim}_rank"),
                dist.get_process_group_ranks(getattr(state, f"{dim}_group")),
            )
            for dim in DIMS
        }
        out[name]["stage"] = (state.is_first_pp_stage, state.is_last_pp_stage)
        assert (state.world_size, state.rank) == (world_size, rank)
        assert state.mesh.mesh_dim_names == ("pp", "dp", "cp", "tp")
        assert state.expert_mesh.mesh_dim_names == ("pp", "edp", "ep", "etp")

    errors = {}
    for label, kwargs in {"tp3": {"tp": 3}, "ep3": {"ep": 3}, "etp8": {"tp": 2, "etp": 8}}.items():
        try:
            ParallelState(**kwargs)
        except ParallelLayoutError as e:
            errors[label] = str(e)
    try:
        ParallelState(tp=2, ep=2).check_divisible(
            num_attention_heads=6, num_query_groups=3, vocab_size=50, num_experts=3
        )
    except ParallelLayoutError as e:
        errors["check_divisible"] = str(e)
    out["errors"] = errors
    return out


def test_groups_and_ranks_of_each_layout_on_four_ranks() -> None:
    results = run_ranks(_describe_layouts, 4, backend="gloo")
    for name, (_, expected) in LAYOUTS.items():
        for rank, result in enumerate(results):
            for dim, groups in expected.items():
                size, dim_rank, members = result[name][dim]
                (group,) = [g for g in groups if rank in g]
                assert members == group, (name, rank, dim)
                assert (size, dim_rank) == (len(group), group.index(rank)), (name, rank, dim)
    # Pipeline stages of tp2 x pp2: ranks 0, 1 are the first stage, ranks 2, 3 the last.
    assert [r["tp2 x pp2"]["stage"] for r in results] == [(True, False)] * 2 + [(False, True)] * 2

    errors = results[0]["errors"]
    assert all(r["errors"] == errors for r in results)
    assert errors["tp3"] == (
        "world size 4 is not divisible by tensor_model_parallel_size (3) × "  # noqa: RUF001
        "pipeline_model_parallel_size (1) × context_parallel_size (1) = 3"  # noqa: RUF001
    )
    assert errors["ep3"] == (
        "world size 4 is not divisible by pipeline_model_parallel_size (1) × "  # noqa: RUF001
        "expert_model_parallel_size (3) × expert_tensor_parallel_size (1) = 3"  # noqa: RUF001
    )
    assert errors["etp8"] == (
        "world size 4 is not divisible by pipeline_model_parallel_size (1) × "  # noqa: RUF001
        "expert_model_parallel_size (1) × expert_tensor_parallel_size (8) = 8"  # noqa: RUF001
    )
    assert errors["check_divisible"] == (
        "num_query_groups (3) is not divisible by tensor_model_parallel_size (2); "
        "num_experts (3) is not divisible by expert_model_parallel_size (2)"
    )


def _from_config(rank: int, world_size: int) -> tuple[int, ...]:
    config = ParallelConfig(
        tensor_model_parallel_size=2,
        expert_model_parallel_size=2,
        expert_tensor_parallel_size=1,
        distributed_backend="gloo",
    )
    state = ParallelState.from_config(config)
    return state.tp_size, state.dp_size, state.ep_size, state.etp_size, state.edp_size


def test_from_config_on_two_ranks() -> None:
    assert run_ranks(_from_config, 2, backend="gloo") == [(2, 1, 2, 1, 1)] * 2
