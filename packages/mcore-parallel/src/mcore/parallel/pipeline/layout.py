"""Which transformer layers a pipeline stage (and each of its virtual chunks) holds."""

from __future__ import annotations

from mcore.parallel.errors import ParallelLayoutError


def stage_layers(
    num_layers: int, *, pp_size: int, pp_rank: int, vp_size: int = 1, vp_stage: int = 0
) -> range:
    """Global indices of the layers that model chunk ``vp_stage`` of stage ``pp_rank`` holds.

    The layers are cut into ``pp_size * vp_size`` equal virtual stages; chunk ``c`` of stage
    ``s`` is virtual stage ``c * pp_size + s`` (Megatron's interleaved assignment: with 8 layers,
    pp 2 and vp 2, stage 0 holds layers 0-1 and 4-5, stage 1 holds 2-3 and 6-7). A micro-batch
    thus visits every stage once per chunk, which is what shrinks the interleaved schedule's
    bubble by ``vp_size``.
    """
    if not 0 <= pp_rank < pp_size:
        raise ParallelLayoutError(f"pp_rank {pp_rank} is outside a pipeline of {pp_size} stages")
    if vp_size < 1 or not 0 <= vp_stage < vp_size:
        raise ParallelLayoutError(
            f"vp_stage {vp_stage} is outside virtual_pipeline_model_parallel_size {vp_size}"
        )
    virtual_stages = pp_size * vp_size
    if num_layers % virtual_stages != 0:
        raise ParallelLayoutError(
            f"num_layers ({num_layers}) is not divisible by pipeline_model_parallel_size "
            f"({pp_size}) \u00d7 virtual_pipeline_model_parallel_size ({vp_size}) = "
            f"{virtual_stages}: every virtual stage must hold the same number of layers"
        )
    per_stage = num_layers // virtual_stages
    first = (vp_stage * pp_size + pp_rank) * per_stage
    return range(first, first + per_stage)
