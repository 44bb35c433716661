"""Megatron's hybrid layer-pattern grammar: layers, ``|`` stage segments, ``/`` MTP blocks."""

from __future__ import annotations

import pytest

from mcore.core import ConfigError, load_config
from mcore.models import TransformerConfig
from mcore.models.hybrid import PatternError, parse_hybrid_pattern
from mcore.parallel import ParallelLayoutError, stage_layers


def test_pattern_splits_into_layers_stage_segments_and_mtp_blocks() -> None:
    parsed = parse_hybrid_pattern("M*-E|M-E*/*-/*-")
    assert parsed.layers == "M*-EM-E*"
    assert parsed.stage_layer_counts == (4, 4)
    assert parsed.mtp_layers == ("*-", "*-")
    assert parsed.symbols == {"M", "*", "-", "E"}
    assert parse_hybrid_pattern("M*").stage_layer_counts is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("M*||-", "empty pipeline segment"),
        ("|M*", "empty pipeline segment"),
        ("M*//-", "MTP block 1 after '/' is empty"),
        ("M*/*|-", "'|' may only split the main layers"),
        ("M* -", "whitespace"),
    ],
)
def test_malformed_patterns_say_what_is_wrong(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match=message):
        parse_hybrid_pattern(pattern)


def test_stage_counts_place_each_virtual_stage() -> None:
    counts = (3, 1, 2, 2)
    layers = [
        list(stage_layers(8, pp_size=2, pp_rank=r, vp_size=2, vp_stage=c, stage_counts=counts))
        for c in range(2)
        for r in range(2)
    ]
    assert layers == [[0, 1, 2], [3], [4, 5], [6, 7]]
    with pytest.raises(ParallelLayoutError, match="give one '|' segment per stage"):
        stage_layers(8, pp_size=4, pp_rank=0, stage_counts=(4, 4))


def test_megatron_newer_name_is_accepted_and_pattern_checked_against_num_layers() -> None:
    cfg = load_config(overrides={"model.num-layers": "3", "model.hybrid-layer-pattern": "*-|*"})
    assert cfg.model.hybrid_override_pattern == "*-|*"
    assert cfg.model.layer_pattern.layers == "*-*"
    with pytest.raises(ConfigError, match="has 3 layer symbols but num_layers is 4"):
        TransformerConfig(num_layers=4, hybrid_override_pattern="*-|*").checked()


def test_mtp_blocks_give_the_mtp_depths() -> None:
    assert (
        TransformerConfig(num_layers=2, hybrid_override_pattern="*-/*-/E").checked().mtp_depth == 2
    )
    with pytest.raises(ConfigError, match="multi-token-prediction block"):
        TransformerConfig(num_layers=2, hybrid_override_pattern="*-/*-", mtp_num_layers=3).checked()


def test_pipe_segments_follow_the_pipeline_or_are_refused() -> None:
    base = {"model.num-layers": "4", "model.hybrid-override-pattern": "*-*|-"}
    assert load_config(overrides=base).model.pipeline_stage_layer_counts == (3, 1)
    load_config(overrides={**base, "parallel.pp": "2"})  # one segment per stage
    with pytest.raises(ConfigError, match="2 '|'-separated segments but the layout has 4"):
        load_config(overrides={**base, "parallel.pp": "4"})
    with pytest.raises(ConfigError, match="use one of the two"):
        load_config(overrides={**base, "model.num-layers-in-first-pipeline-stage": "3"})
