"""Tiny Hugging Face model directories built from random configs (no downloads), shared by the
inference tests: ``transformers`` is the oracle, mcore loads the same files.

Each directory holds what a real one does: config.json, model.safetensors, a byte-level BPE
``tokenizer.json`` trained here on a few sentences, ``tokenizer_config.json`` with a chat
template, and generation_config.json. The model's vocabulary is the tokenizer's size, and
token 0 (``<|endoftext|>``) is its end-of-sequence id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

TEXTS = [
    "the quick brown fox jumps over the lazy dog. ",
    "hello world, this is a tiny model that speaks nonsense. ",
    "paged attention keeps keys and values in blocks; ",
    "continuous batching mixes prefill chunks with decode tokens. ",
] * 8
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)
CASES = {
    "llama": ("LlamaConfig", dict(intermediate_size=64)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4)),
    # MLA (compressed KV), grouped sigmoid routing, a shared expert, layer 0 dense.
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(**MLA, q_lora_rank=16, intermediate_size=48, moe_intermediate_size=24,
             n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             routed_scaling_factor=2.0, n_shared_experts=1, first_k_dense_replace=1),
    ),
}  # fmt: skip


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer.json and tokenizer_config.json in ``folder``; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE}
        )
    )
    return tok.get_vocab_size(with_added_tokens=True)


def make_hf_model(case: str, folder: Path, seed: int = 0):
    """Save a random ``case`` model with its tokenizer to ``folder``; returns the HF model."""
    vocab = write_tokenizer(folder)
    config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, "vocab_size": vocab})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0.0, 0.1)  # zero by default: make it count
    model.generation_config.eos_token_id = 0
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """``{case: (folder, transformers model)}``, built once per session."""
    root = tmp_path_factory.mktemp("hf-models")
    return {case: (root / case, make_hf_model(case, root / case)) for case in CASES}


@pytest.fixture(scope="session")
def llama_dir(hf_dirs) -> Path:
    return hf_dirs["llama"][0]


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``transformers`` greedy decoding of one prompt, end-of-sequence ignored."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=1,
        )
    return out[0, len(prompt) :].tolist()


def _random_prompts(lengths, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine_config(**overrides):
    """An engine config for CPU tests: small blocks, a few hundred cached tokens."""
    from mcore.inference import InferenceConfig

    base = dict(
        max_requests=8,
        max_tokens=64,
        block_size_tokens=8,
        kv_cache_blocks=128,
        device="cpu",
        max_sequence_length=512,
    )
    return InferenceConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(hf_model, prompt_ids, n)``: transformers' greedy continuation."""
    return _hf_greedy


@pytest.fixture(scope="session")
def random_prompts():
    """``random_prompts(lengths, vocab, seed=1)``: random token-id prompts."""
    return _random_prompts


@pytest.fixture(scope="session")
def engine_config():
    """``engine_config(**overrides)``: an ``InferenceConfig`` sized for CPU tests."""
    return _engine_config


@pytest.fixture(scope="session")
def llama_engine_factory(llama_dir):
    """``make(**config_overrides)``: a fresh engine over the tiny Llama, with its tokenizer."""
    from mcore.inference import DynamicInferenceEngine, load_model

    def make(**overrides):
        model, tokenizer = load_model(llama_dir)
        return DynamicInferenceEngine(model, _engine_config(**overrides), tokenizer=tokenizer)

    return make
