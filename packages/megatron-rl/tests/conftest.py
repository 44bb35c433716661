"""Shared pieces of megatron-rl's tests: a tiny run config (char tokenizer, 2-layer GPT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mcore.core import Config, load_config

TINY = {
    "model.num-layers": "2",
    "model.hidden-size": "32",
    "model.num-attention-heads": "4",
    "model.ffn-hidden-size": "64",
    "model.max-position-embeddings": "64",
    "data.tokenizer": "char",
    "train.seq-length": "32",
    "train.micro-batch-size": "4",
    "train.seed": "3",
    "optimizer.lr-decay-style": "constant",
    "logger.progress-bar": "false",
    "logger.log-interval": "1",
    "rl.char-alphabet": "abcd=",
    "rl.env-alphabet": "abcd",
    "rl.prompts-per-step": "4",
    "rl.group-size": "4",
    "rl.max-new-tokens": "4",
}


def tiny_config(**overrides: Any) -> Config:
    """The tiny run, with ``section__field=value`` overrides (``rl__kl_beta=0.1``)."""
    extra = {k.replace("__", ".").replace("_", "-"): str(v) for k, v in overrides.items()}
    return load_config(overrides={**TINY, **extra})


@pytest.fixture
def tiny() -> Callable[..., Config]:
    """:func:`tiny_config`, for tests (conftest modules are not importable by name)."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_overrides() -> dict[str, str]:
    """The tiny run's overrides (for rank functions, which build their own config)."""
    return dict(TINY)
