"""Which layers a pipeline stage holds, and the shape of what passes between stages."""

from __future__ import annotations

import pytest

from mcore.parallel import (
    P2PShapeError,
    ParallelLayoutError,
    ParallelState,
    forward_backward_no_pipelining,
    get_forward_backward_func,
    pipeline_tensor_shape,
    stage_layers,
)


def test_stages_split_the_layers_evenly_in_order() -> None:
    held = [list(stage_layers(8, pp_size=4, pp_rank=r)) for r in range(4)]
    assert held == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_virtual_chunks_follow_megatrons_interleaved_assignment() -> None:
    # Chunk c of stage s is virtual stage c * pp + s.
    held = {
        (s, c): list(stage_layers(8, pp_size=2, pp_rank=s, vp_size=2, vp_stage=c))
        for s in range(2)
        for c in range(2)
    }
    assert held == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}


def test_layers_that_do_not_divide_name_every_size() -> None:
    with pytest.raises(ParallelLayoutError) as err:
        stage_layers(6, pp_size=2, pp_rank=0, vp_size=2)
    message = str(err.value)
    assert "num_layers (6)" in message
    assert "pipeline_model_parallel_size (2)" in message
    assert "virtual_pipeline_model_parallel_size (2)" in message
    with pytest.raises(ParallelLayoutError, match="vp_stage 2"):
        stage_layers(8, pp_size=2, pp_rank=0, vp_size=2, vp_stage=2)


def test_end_stages_may_hold_their_own_number_of_layers() -> None:
    # DeepSeek-V3: 61 layers over 16 stages, four on the first and one on the last.
    held = [
        list(stage_layers(61, pp_size=16, pp_rank=r, first_stage_layers=4, last_stage_layers=1))
        for r in range(16)
    ]
    assert [len(h) for h in held] == [4] + [4] * 14 + [1]
    assert [i for h in held for i in h] == list(range(61))
    two = [list(stage_layers(3, pp_size=2, pp_rank=r, first_stage_layers=2)) for r in range(2)]
    assert two == [[0, 1], [2]]
    # One stage: the whole model, whatever the end counts say.
    assert list(stage_layers(3, pp_size=1, pp_rank=0, first_stage_layers=2)) == [0, 1, 2]


def test_end_stage_counts_that_leave_an_uneven_rest_name_the_fields() -> None:
    with pytest.raises(ParallelLayoutError, match=r"num_layers_in_first_pipeline_stage=3.*leaves"):
        stage_layers(8, pp_size=3, pp_rank=0, first_stage_layers=3)
    with pytest.raises(ParallelLayoutError, match="num_layers_in_last_pipeline_stage must be"):
        stage_layers(8, pp_size=2, pp_rank=0, last_stage_layers=0)
    with pytest.raises(ParallelLayoutError, match="virtual_pipeline_model_parallel_size"):
        stage_layers(8, pp_size=2, pp_rank=0, vp_size=2, first_stage_layers=2)


def test_exchanged_shape_is_sequence_first_and_split_by_sp_and_cp() -> None:
    assert pipeline_tensor_shape(16, 2, 64) == (16, 2, 64)
    assert pipeline_tensor_shape(16, 2, 64, tp_size=2) == (16, 2, 64)  # TP alone: full sequence
    assert pipeline_tensor_shape(16, 2, 64, tp_size=2, sequence_parallel=True) == (8, 2, 64)
    assert pipeline_tensor_shape(16, 2, 64, tp_size=2, cp_size=2, sequence_parallel=True) == (
        4,
        2,
        64,
    )
    with pytest.raises(P2PShapeError, match="context_parallel_size"):
        pipeline_tensor_shape(15, 2, 64, cp_size=2)


def test_one_stage_gets_the_plain_loop() -> None:
    schedule = get_forward_backward_func(ParallelState())
    assert schedule.func is forward_backward_no_pipelining
    with pytest.raises(ParallelLayoutError, match="pipeline_model_parallel_size > 1"):
        get_forward_backward_func(ParallelState(), vp_size=2)
