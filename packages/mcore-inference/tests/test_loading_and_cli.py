"""``load_model`` for both kinds of ``--model PATH``, and ``mcore generate`` / ``mcore serve``
run as a user runs them (subprocesses, real HTTP). mcore checkpoints are written here in
mcore-ckpt's layout (``latest`` -> ``iter_*/common.json``) with stand-in formats registered at
run time, so these tests hold the registry contract without depending on mcore-ckpt; the
integration tests load a real ``mcore train`` checkpoint."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore.core import McoreError, hookimpl, load_config, register_plugin, unregister_plugin
from mcore.core.testing import served
from mcore.inference import DynamicInferenceEngine, SamplingParams, load_model
from mcore.inference.loading import detect_model_kind
from mcore.inference.tokenizer import CoreTextTokenizer, HFTextTokenizer
from mcore.models import GPTModel

BIN = Path(sys.executable).parent
SMALL_MODEL = {
    "model.num-layers": "2",
    "model.hidden-size": "32",
    "model.num-attention-heads": "4",
    "model.ffn-hidden-size": "64",
}
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _trained_run():
    """A run config and a model as ``mcore train`` builds them (byte tokenizer, vocab 384)."""
    config = load_config(overrides=SMALL_MODEL)
    model_config = dataclasses.replace(config.model, vocab_size=384)
    torch.manual_seed(3)
    return config, GPTModel(model_config, sections=config)


def _save_checkpoint(root: Path, fmt: str, config, model) -> Path:
    """The layout of mcore-ckpt: ``latest`` -> ``iter_*`` holding ``common.json``."""
    folder = root / "iter_0000003"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "w.safetensors")
    common = {
        "format": fmt,
        "iteration": 3,
        "config": config.to_dict(),
        "model": json.loads(json.dumps(dataclasses.asdict(model.config), default=str)),
    }
    (folder / "common.json").write_text(json.dumps(common))
    (root / "latest").write_text("iter_0000003\n")
    return folder


class WeightsOnlyFormat:
    """A stand-in for an mcore-ckpt format (every member of its protocol) that loads weights.
    Registered as a class, which the loader instantiates."""

    name = "test_weights"
    supports_async = False
    weights_only = True
    calls: list[Path] = []

    def load_model(self, folder: Path, model: torch.nn.Module) -> None:
        self.calls.append(folder)
        model.load_state_dict(load_file(folder / "w.safetensors"))

    def prepare(self, chunks, optimizer):
        raise NotImplementedError

    def write(self, folder, prepared, *, group, abort=None):
        raise NotImplementedError

    def load(self, folder, chunks, optimizer, *, group, common, verify_checksums=True):
        raise NotImplementedError

    def describe(self, folder):
        raise NotImplementedError


class TrainingFormat:
    """A format with only the training loop's ``load``: not a checkpoint format."""

    def load(self, folder, chunks, optimizer, *, group, common) -> None:
        chunks[0].load_state_dict(load_file(folder / "w.safetensors"))


class _Formats:
    @hookimpl
    def mcore_register(self, registry) -> None:
        registry.add("checkpoint_format", "test_weights", WeightsOnlyFormat)


@pytest.fixture
def formats():
    register_plugin(_Formats(), name="test-formats")
    yield
    unregister_plugin("test-formats")


def test_model_kinds_are_told_apart(llama_dir, tmp_path) -> None:
    assert detect_model_kind(llama_dir) == "hf"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("iter_0000001")
    assert detect_model_kind(tmp_path / "run") == "mcore"
    with pytest.raises(McoreError, match="neither a Hugging Face"):
        detect_model_kind(tmp_path)
    with pytest.raises(McoreError, match="no such directory"):
        detect_model_kind(tmp_path / "missing")
    model, tokenizer = load_model(llama_dir)
    assert isinstance(tokenizer, HFTextTokenizer) and model.config.vocab_size > 0


def test_mcore_checkpoints_load_through_the_format_registry(
    formats, tmp_path, engine_config
) -> None:
    config, trained = _trained_run()
    folder = _save_checkpoint(tmp_path / "run", "test_weights", config, trained)
    WeightsOnlyFormat.calls.clear()
    for path in (tmp_path / "run", folder):  # the save directory or one iter_* folder
        model, tokenizer = load_model(path)
        assert isinstance(tokenizer, CoreTextTokenizer) and tokenizer.vocab_size < 384
        for name, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    assert WeightsOnlyFormat.calls == [folder, folder]
    engine = DynamicInferenceEngine(model, engine_config(), tokenizer=tokenizer)
    out = engine.generate(["def f"], GREEDY)[0]
    assert len(out.token_ids) == 6 and max(out.token_ids) < tokenizer.vocab_size


def test_a_format_that_cannot_load_weights_alone_is_refused() -> None:
    # With mcore-ckpt installed its CheckpointFormat protocol holds for every entry.
    pytest.importorskip("mcore.ckpt")

    class Plugin:
        @hookimpl
        def mcore_register(self, registry) -> None:
            registry.add("checkpoint_format", "test_training", TrainingFormat)

    with pytest.raises(McoreError, match=r"'test_training' .* lacks `name`.*`load_model`"):
        register_plugin(Plugin(), name="test-training-format")


def test_a_missing_checkpoint_format_says_what_to_install(tmp_path) -> None:
    config, trained = _trained_run()
    _save_checkpoint(tmp_path / "run", "not_installed", config, trained)
    with pytest.raises(McoreError, match=r"pip install mcore-ckpt") as info:
        load_model(tmp_path / "run")
    assert "'not_installed'" in str(info.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latest").write_text("iter_0000009")
    with pytest.raises(McoreError, match="not a complete checkpoint"):
        load_model(tmp_path / "bad")


def _mcore(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mcore"), *args], capture_output=True, text=True, timeout=timeout
    )


CPU = [
    "--inference.device",
    "cpu",
    "--inference.kv-cache-blocks",
    "64",
    "--inference.block-size-tokens",
    "16",
]


def test_mcore_generate_prints_the_completion(llama_dir, tmp_path, llama_engine_factory) -> None:
    result = _mcore(
        "generate",
        "--model",
        str(llama_dir),
        "--prompt",
        "hello world",
        "--max-tokens",
        "6",
        "--ignore-eos",
        *CPU,
    )
    assert result.returncode == 0, result.stderr
    engine = llama_engine_factory()
    want = engine.generate([engine.tokenizer.encode("hello world")], GREEDY)[0]
    assert result.stdout == want.text + "\n"


def test_mcore_generate_in_process_json_and_errors(formats, tmp_path, capsys) -> None:
    from mcore.core.cli import main

    config, trained = _trained_run()
    _save_checkpoint(tmp_path / "run", "test_weights", config, trained)
    argv = [
        "generate",
        "--model",
        str(tmp_path / "run"),
        "--prompt",
        "def ",
        "--prompt",
        "x = ",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
        *CPU,
    ]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    assert all(len(line["token_ids"]) == 4 and len(line["logprobs"]) == 4 for line in lines)

    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "Traceback" not in err
    assert main(["generate", "--model", str(tmp_path / "run")]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_mcore_serve_answers_http_until_interrupted(llama_dir) -> None:
    command = [
        str(BIN / "mcore"), "serve", "--model", str(llama_dir), "--api-key", "k",
        "--served-model-name", "tiny", *CPU,
    ]  # fmt: skip
    with served(command) as url:
        with urllib.request.urlopen(url + "/health", timeout=60) as response:
            assert json.load(response)["status"] == "ok"
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 3}).encode(),
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.load(response)
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] <= 3


def test_cli_commands_are_registered_with_their_knobs() -> None:
    from mcore.core import get_registry
    from mcore.core.cli import build_parser

    assert {"generate", "serve"} <= set(get_registry("cli_command").names())
    commands = build_parser()._subparsers._group_actions[0].choices
    text = commands["serve"].format_help()
    for flag in (
        "--model",
        "--port",
        "--api-key",
        "--inference.max-requests",
        "--inference.enable-cuda-graph",
        "--inference.block-size-tokens",
    ):
        assert flag in text
    assert "--prompt" in commands["generate"].format_help()
