"""Shared pieces of megatron-rl's tests: a tiny run config (char tokenizer, 2-layer GPT)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

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


TEXTS = ["the quick brown fox jumps over the lazy dog. ", "a tiny model speaks nonsense. "] * 8


def write_llama(folder: Path) -> object:
    """A random Llama with a byte-level BPE tokenizer, saved as a Hugging Face directory."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})
    )
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
        pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model.generation_config.eos_token_id = 0
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def write_hf_llama() -> Callable[[Path], object]:
    """:func:`write_llama`: a random Llama and its tokenizer as a Hugging Face folder."""
    pytest.importorskip("transformers")
    return write_llama
