"""Which transformer layers a pipeline stage (and each of its virtual chunks) holds."""

from __future__ import annotations

from collections.abc import Sequence

from mcore.parallel.errors import ParallelLayoutError


def stage_layers(
    num_layers: int,
    *,
    pp_size: int,
    pp_rank: int,
    vp_size: int = 1,
    vp_stage: int = 0,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    stage_counts: Sequence[int] | None = None,
) -> range:
    """Global indices of the layers that model chunk ``vp_stage`` of stage ``pp_rank`` holds.

    The layers are cut into ``pp_size * vp_size`` equal virtual stages; chunk ``c`` of stage
    ``s`` is virtual stage ``c * pp_size + s`` (Megatron's interleaved assignment: with 8 layers,
    pp 2 and vp 2, stage 0 holds layers 0-1 and 4-5, stage 1 holds 2-3 and 6-7). A micro-batch
    thus visits every stage once per chunk, which is what shrinks the interleaved schedule's
    bubble by ``vp_size``.

    ``first_stage_layers`` / ``last_stage_layers`` (Megatron's
    ``num_layers_in_first_pipeline_stage`` / ``..._last_...``) give the end stages their own
    counts and split the rest equally over the stages between, for depths that do not divide
    (DeepSeek-V3's 61 layers over 16 stages) or to lighten the stages that also hold the
    embedding or the output layer. Not combined with virtual stages.
    """
    if not 0 <= pp_rank < pp_size:
        raise ParallelLayoutError(f"pp_rank {pp_rank} is outside a pipeline of {pp_size} stages")
    if vp_size < 1 or not 0 <= vp_stage < vp_size:
        raise ParallelLayoutError(
            f"vp_stage {vp_stage} is outside virtual_pipeline_model_parallel_size {vp_size}"
        )
    if stage_counts is not None:
        virtual = vp_stage * pp_size + pp_rank
        if len(stage_counts) != pp_size * vp_size or sum(stage_counts) != num_layers:
            raise ParallelLayoutError(
                f"the layer pattern splits {sum(stage_counts)} layers into {len(stage_counts)} "
                f"segments, but the layout has {pp_size * vp_size} (virtual) pipeline stages "
                f"and {num_layers} layers: give one '|' segment per stage"
            )
        first = sum(stage_counts[:virtual])
        return range(first, first + stage_counts[virtual])
    if pp_size > 1 and (first_stage_layers is not None or last_stage_layers is not None):
        if vp_size > 1:
            raise ParallelLayoutError(
                "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage cannot "
                "be combined with virtual_pipeline_model_parallel_size > 1: unset one of them"
            )
        counts = _uneven_counts(num_layers, pp_size, first_stage_layers, last_stage_layers)
        first = sum(counts[:pp_rank])
        return range(first, first + counts[pp_rank])
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


def _uneven_counts(num_layers: int, pp_size: int, first: int | None, last: int | None) -> list[int]:
    """Layers per stage with the end stages' counts given and the rest split equally."""
    ends = {0: first, pp_size - 1: last}
    given = {stage: n for stage, n in ends.items() if n is not None}
    fields = {
        0: "num_layers_in_first_pipeline_stage",
        pp_size - 1: "num_layers_in_last_pipeline_stage",
    }
    for stage, n in given.items():
        if n < 1:
            raise ParallelLayoutError(f"{fields[stage]} must be at least 1, got {n}")
    middle = pp_size - len(given)
    rest = num_layers - sum(given.values())
    shown = ", ".join(f"{fields[s]}={n}" for s, n in given.items())
    uneven = rest != 0 if middle == 0 else rest < middle or rest % middle != 0
    if uneven:
        raise ParallelLayoutError(
            f"num_layers ({num_layers}) with {shown} leaves {rest} layers for the other "
            f"{middle} of pipeline_model_parallel_size ({pp_size}) stages, which must split "
            "them equally (at least one each)"
        )
    per = rest // middle if middle else 0
    return [given.get(stage, per) for stage in range(pp_size)]
