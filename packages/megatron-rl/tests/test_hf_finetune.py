"""GRPO on a Hugging Face model, as a user runs it: ``mcore ckpt import-hf`` turns the folder
into an mcore checkpoint (weights and tokenizer), and ``mcore rl`` starts from it with
``rl.finetune`` and ``rl.use_checkpoint_args`` (the architecture read from the checkpoint).
The oracle is ``transformers``: before any update, the engine's log-probs of what it samples
are the Hugging Face model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mcore.core import McoreError, load_config
from mcore.core.cli import main as mcore_main
from megatron_rl.loop import train_rl

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def imported(tmp_path_factory, write_hf_llama) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("rl-hf")
    hf = write_hf_llama(root / "llama")
    assert mcore_main(["ckpt", "import-hf", str(root / "llama"), str(root / "ckpt")]) == 0
    return root / "llama", root / "ckpt", hf


def _config(ckpt: Path, save: Path, **overrides: str):
    return load_config(
        overrides={
            "checkpoint.load": str(ckpt),
            "checkpoint.save": str(save),
            "rl.finetune": "true",
            "rl.use-checkpoint-args": "true",
            "data.tokenizer": "hf",
            "data.tokenizer-path": str(ckpt / "iter_0000000" / "tokenizer.json"),
            "train.seq-length": "48",
            "train.micro-batch-size": "4",
            "train.device": "cpu",
            "train.seed": "2",
            "optimizer.lr": "1e-3",
            "optimizer.lr-decay-style": "constant",
            "logger.progress-bar": "false",
            "rl.env": "string_copy",
            "rl.env-alphabet": "abc",
            "rl.prompts-per-step": "4",
            "rl.group-size": "4",
            "rl.max-new-tokens": "6",
            "rl.kl-beta": "0.05",
            **overrides,
        }
    )


def test_grpo_starts_from_an_imported_hugging_face_model(imported, tmp_path) -> None:
    _, ckpt, hf = imported
    result = train_rl(_config(ckpt, tmp_path / "run", **{"train.train-iters": "2"}))
    assert result.chunks[0].module.config.hidden_size == hf.config.hidden_size
    first = result.metrics[0]
    # Step 1 samples from the imported weights and trains them: the trainer's log-probs are
    # the engine's (importance weight 1) and the reference is the same model (KL 0).
    assert first["rl/importance_weight"] == pytest.approx(1.0, abs=1e-5)
    assert first["rl/kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert result.checkpoint == str(tmp_path / "run" / "iter_0000002")


def test_the_engine_before_any_update_is_the_hugging_face_model(imported, tmp_path) -> None:
    from megatron_rl.handles import EngineHandle, encode_text

    _, ckpt, hf = imported
    # A tiny LR: the weights after one step are the imported ones to well within 1e-6.
    result = train_rl(
        _config(ckpt, tmp_path / "run", **{"train.train-iters": "1", "optimizer.lr": "1e-12"})
    )
    engine = result.engine
    engine.resume()
    handle = EngineHandle(engine)
    prompt = encode_text(handle.tokenizer, "the quick")
    out = handle.generate(prompt, max_tokens=6, temperature=1.0, seed=0, ignore_eos=True)
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    rows = range(len(prompt) - 1, len(prompt) + len(out.token_ids) - 1)
    expected = [logprobs[r, t].item() for r, t in zip(rows, out.token_ids, strict=True)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_use_checkpoint_args_needs_a_checkpoint(tmp_path) -> None:
    config = load_config(overrides={"rl.use-checkpoint-args": "true"})
    with pytest.raises(McoreError, match="rl.use_checkpoint_args needs checkpoint.load"):
        train_rl(config)
