"""Small model configs shared by the model tests."""

from __future__ import annotations

import pytest

from mcore.models import TransformerConfig


def tiny_config(**overrides) -> TransformerConfig:
    """A 2-layer GQA model small enough to run in milliseconds on a CPU."""
    base = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return TransformerConfig(**{**base, **overrides})


@pytest.fixture
def tiny():
    """``tiny(**overrides)`` -> a tiny ``TransformerConfig``."""
    return tiny_config


@pytest.fixture
def config() -> TransformerConfig:
    return tiny_config()
