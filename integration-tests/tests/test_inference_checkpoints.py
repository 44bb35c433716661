"""mcore-inference serves mcore-ckpt checkpoints through the ``checkpoint_format`` registry.

A Hugging Face model imported with ``mcore ckpt import-hf`` generates, through the engine,
exactly what ``transformers`` generates from the original (greedy, token for token); a
checkpoint ``mcore train`` wrote loads with the trained weights and serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mcore.core.cli import main as mcore_main  # noqa: E402
from mcore.inference import (  # noqa: E402
    DynamicInferenceEngine,
    InferenceConfig,
    SamplingParams,
    load_model,
)

BIN = Path(sys.executable).parent
ENGINE = dict(device="cpu", kv_cache_blocks=64, block_size_tokens=16, max_sequence_length=256)


def _tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["serving models from checkpoints, token by token. "] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tok.get_vocab_size(with_added_tokens=True)


def test_an_imported_hf_checkpoint_generates_what_transformers_does(tmp_path, capsys) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    vocab = _tokenizer(hf_dir)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(hf_dir)
    assert mcore_main(["ckpt", "import-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0

    model, tokenizer = load_model(tmp_path / "ckpt")  # latest -> iter_0000000, torch_dist
    assert tokenizer.vocab_size == vocab
    engine = DynamicInferenceEngine(model, InferenceConfig(**ENGINE), tokenizer=tokenizer)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 23, 11)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=10,
                min_new_tokens=10,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == want


def test_a_trained_checkpoint_loads_its_weights_and_serves(tmp_path) -> None:
    save = tmp_path / "run"
    result = subprocess.run(
        [
            str(BIN / "mcore"),
            "train",
            "--nproc",
            "1",
            "--train.device",
            "cpu",
            "--train.train-iters",
            "3",
            "--train.micro-batch-size",
            "2",
            "--train.seq-length",
            "32",
            "--data.max-bytes",
            "50000",
            "--data.cache-dir",
            str(tmp_path / "cache"),
            "--model.num-layers",
            "2",
            "--model.hidden-size",
            "32",
            "--model.num-attention-heads",
            "4",
            "--checkpoint.save",
            str(save),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    model, tokenizer = load_model(save)
    folder = save / (save / "latest").read_text().strip()
    stored = json.loads((folder / "common.json").read_text())
    assert model.config.vocab_size == stored["model"]["vocab_size"]
    # The same weights as mcore-ckpt's own export of the checkpoint, tensor by tensor.
    assert mcore_main(["ckpt", "export-hf", str(save), str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    torch.testing.assert_close(
        model.embedding.weight, exported["model.embed_tokens.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        model.layers["1"].mlp.linear_fc2.weight,
        exported["model.layers.1.mlp.down_proj.weight"],
        rtol=0,
        atol=0,
    )

    engine = DynamicInferenceEngine(model, InferenceConfig(**ENGINE), tokenizer=tokenizer)
    out = engine.generate(["def main():"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and isinstance(out.text, str)
