"""``mcore ckpt``: inspect, convert, import-hf and export-hf, run as a user runs them.

The oracle for import/export is ``transformers``: a Hugging Face model built from a config with
random weights goes through ``import-hf`` and back out through ``export-hf``, and the model
``transformers`` loads from the export gives the original's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcore.ckpt import directory, get_format, read_common
from mcore.ckpt.cli import _build_model
from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train

transformers = pytest.importorskip("transformers")

BIN = Path(sys.executable).parent


def mcore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mcore"), *args], capture_output=True, text=True, timeout=300)


def config(cache: str, **overrides: str):
    base = {
        "train.train-iters": "6",
        "train.micro-batch-size": "2",
        "train.seq-length": "32",
        "train.device": "cpu",
        "data.max-bytes": "100000",
        "data.cache-dir": cache,
        "model.num-layers": "2",
        "model.hidden-size": "32",
        "model.num-attention-heads": "4",
        "model.ffn-hidden-size": "64",
        "optimizer.lr": "3e-3",
        "optimizer.lr-warmup-iters": "1",
        "logger.log-interval": "1000",
    }
    return load_config(overrides={**base, **overrides})


def _train(rank: int, world: int, cache: str, overrides: dict) -> list[float]:
    return train(config(cache, **overrides)).losses


def train_losses(cache: str, **overrides: str) -> list[float]:
    """``mcore train`` on one rank of its own process, so the run starts from a fresh process
    group and leaves none behind in the test process."""
    return run_ranks(_train, 1, cache, overrides, timeout_s=600)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, str, list[float]]:
    """A one-rank run of 6 steps that saved at step 3 (and 6), its step-3 checkpoint, and its
    curve: resuming at step 3 must give its last 3 losses."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cache = str(tmp / "cache")
    reference = train_losses(
        cache, **{"checkpoint.save": str(tmp / "run"), "checkpoint.save-interval": "3"}
    )
    return tmp / "run" / "iter_0000003", cache, reference


def test_inspect_shows_format_layout_and_every_tensor(saved) -> None:
    run, _, _ = saved
    result = mcore("ckpt", "inspect", str(run), "--json", "--verify")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "torch_dist" and info["iteration"] == 3 and info["verified"]
    assert info["layout"]["world_size"] == 1 and info["layout"]["tp_size"] == 1
    assert info["model"]["hidden_size"] == 32
    tensors = {t["key"]: t for t in info["tensors"]}
    qkv = tensors["model.layers.0.self_attention.linear_qkv.weight"]
    assert qkv["shape"] == [96, 32] and qkv["dtype"] == "float32" and qkv["bytes"] == 96 * 32 * 4
    assert "optimizer.state.layers.0.self_attention.linear_qkv.weight.exp_avg" in tensors
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    text = mcore("ckpt", "inspect", str(run))
    assert text.returncode == 0 and "format:     torch_dist  (step 3)" in text.stdout
    assert "layers.0.self_attention.linear_qkv.weight" in text.stdout


def test_inspect_reports_a_missing_checkpoint(tmp_path: Path) -> None:
    result = mcore("ckpt", "inspect", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_converted_checkpoints_resume_the_same_run(saved, tmp_path: Path) -> None:
    run, cache, reference = saved
    to_fsdp = mcore("ckpt", "convert", str(run), str(tmp_path / "fsdp"), "--format", "fsdp_dtensor")
    assert to_fsdp.returncode == 0, to_fsdp.stderr
    info = json.loads(mcore("ckpt", "inspect", str(tmp_path / "fsdp"), "--json").stdout)
    assert info["format"] == "fsdp_dtensor"
    assert not [t for t in info["tensors"] if t["key"].startswith("rng.")]
    back = mcore("ckpt", "convert", str(tmp_path / "fsdp"), str(tmp_path / "back"),
                 "--format", "torch_dist")  # fmt: skip
    assert back.returncode == 0, back.stderr
    for folder in ("fsdp", "back"):
        where = {
            "checkpoint.load": str(tmp_path / folder),
            "checkpoint.save": str(tmp_path / f"{folder}-2"),
        }
        assert train_losses(cache, **where) == pytest.approx(reference[3:], rel=1e-6), folder


def _plain_megatron_fsdp_logits(rank: int, world: int, folder: str) -> torch.Tensor:
    """A GPTModel sharded with plain megatron_fsdp calls, loaded by megatron_fsdp itself."""
    import megatron_fsdp
    from mcore.models import GPTModel, TransformerConfig

    common = read_common(Path(folder))
    model = GPTModel(TransformerConfig(**common["model"]), init_seed=123)  # other weights
    for layer in model.layers.values():
        megatron_fsdp.fully_shard(layer)
    megatron_fsdp.fully_shard(model)
    megatron_fsdp.load_checkpoint(folder, model)
    ids = torch.arange(16).view(2, 8)
    with torch.no_grad():
        return model(ids)


def test_megatron_fsdp_reads_an_fsdp_dtensor_checkpoint_of_mcore_train(saved, tmp_path) -> None:
    run, _, _ = saved
    mcore("ckpt", "convert", str(run), str(tmp_path / "fsdp"), "--format", "fsdp_dtensor")
    folder = str(tmp_path / "fsdp" / "iter_0000003")  # convert keeps the step
    (logits,) = run_ranks(_plain_megatron_fsdp_logits, 1, folder, timeout_s=600)
    model = _build_model(read_common(Path(folder)))
    get_format("fsdp_dtensor").load_model(Path(folder), model)
    with torch.no_grad():
        expected = model(torch.arange(16).view(2, 8))
    torch.testing.assert_close(logits, expected)


def test_a_hugging_face_model_imports_and_exports_unchanged(tmp_path: Path) -> None:
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    original.save_pretrained(tmp_path / "hf")
    imported = mcore("ckpt", "import-hf", str(tmp_path / "hf"), str(tmp_path / "mcore"))
    assert imported.returncode == 0, imported.stderr
    common = read_common(directory.resolve(tmp_path / "mcore"))  # (inspect: tests above)
    assert common["iteration"] == 0 and common["model"]["num_query_groups"] == 4
    exported = mcore("ckpt", "export-hf", str(tmp_path / "mcore"), str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, original(ids).logits, atol=1e-5, rtol=0)
