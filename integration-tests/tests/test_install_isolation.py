"""Each wheel installs on its own and brings only what it needs.

Every test installs one package into a fresh virtual environment, from wheels of this checkout
with third parties pinned to uv.lock (see conftest.py), and looks at the result from outside:
what got installed, what imports, and what ``mcore plugins`` reports.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def ours_installed(wheels):
    """Which of our distributions a venv has."""
    return lambda venv: set(wheels) & set(venv.distributions())


@pytest.fixture(scope="module")
def core_only(make_venv):
    return make_venv("mcore-core")


@pytest.fixture(scope="module")
def fsdp_only(make_venv):
    return make_venv("megatron-fsdp")


@pytest.fixture(scope="module")
def moe(make_venv):
    return make_venv("mcore-moe")


@pytest.fixture(scope="module")
def ssm(make_venv):
    return make_venv("mcore-ssm")


def test_our_wheels_win_over_pypi_namesakes(fsdp_only, wheels) -> None:
    # PyPI has an unrelated megatron-fsdp 0.6.x; the overrides must install our wheel instead.
    assert fsdp_only.distributions()["megatron-fsdp"].version == "0.1.0"
    assert fsdp_only.source_of("megatron-fsdp") == wheels["megatron-fsdp"].as_uri()


def test_mcore_core_alone_lists_only_its_own_plugin(core_only, ours_installed) -> None:
    assert ours_installed(core_only) == {"mcore-core"}

    report = core_only.mcore_json("plugins", "--json")

    assert [p["name"] for p in report["plugins"]] == ["mcore-core"]
    assert report["failed"] == []


def test_mcore_core_alone_shows_its_config(core_only) -> None:
    (core,) = core_only.mcore_json("plugins", "--json")["plugins"]

    config = core_only.mcore_json("config", "show", "--json", "--train.train-iters", "7")

    # Exactly the core's own sections: no model, parallel or moe without their packages.
    assert sorted(config) == core["components"]["config_section"]
    assert config["train"]["train_iters"] == 7


def test_mcore_core_alone_has_no_models(core_only) -> None:
    result = core_only.python("import mcore.models")

    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'mcore.models'" in result.stderr


def test_megatron_fsdp_stands_alone_without_mcore(fsdp_only) -> None:
    assert fsdp_only.python("import megatron_fsdp").returncode == 0

    result = fsdp_only.python("import mcore")
    assert "ModuleNotFoundError: No module named 'mcore'" in result.stderr


def test_megatron_fsdp_alone_trains_and_checkpoints_a_plain_pytorch_model(
    fsdp_only, tmp_path
) -> None:
    # The README's example, on two gloo ranks, in a venv holding megatron-fsdp and torch only.
    script = ROOT / "packages/megatron-fsdp/examples/train_plain_pytorch.py"
    checkpoint = tmp_path / "ckpt"
    result = fsdp_only.run(
        "python", "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
        "--steps", "12", "--checkpoint", str(checkpoint),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss (\S+) -> (\S+)", result.stdout).groups())
    assert last < first - 1.0, result.stdout
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip


def test_megatron_fsdp_brings_torch_and_nothing_else(fsdp_only, ours_installed) -> None:
    installed = set(fsdp_only.distributions())

    # numpy: torch.distributed.checkpoint needs it at run time, and torch does not declare it.
    expected = {"megatron-fsdp", "numpy"} | fsdp_only.requirement_closure("torch")
    assert installed == expected
    assert "pluggy" not in installed
    assert ours_installed(fsdp_only) == {"megatron-fsdp"}


def test_mcore_moe_pulls_its_chain_and_nothing_else(moe, wheels, ours_installed) -> None:
    chain = {"mcore-core", "mcore-parallel", "mcore-models", "mcore-moe"}

    assert ours_installed(moe) == chain
    for name in chain:
        assert moe.source_of(name) == wheels[name].as_uri()
    # What inference needs stays out (safetensors comes with mcore-models' HF interop).
    assert not {"pyzmq", "msgpack"} & set(moe.distributions())
    assert "safetensors" in moe.distributions()


def test_mcore_moe_plugins_and_moe_config(moe) -> None:
    report = moe.mcore_json("plugins", "--json")

    plugins = {p["name"]: p for p in report["plugins"]}
    assert set(plugins) == {"mcore-core", "mcore-parallel", "mcore-models", "mcore-moe"}
    assert report["failed"] == []
    assert "moe" in plugins["mcore-moe"]["components"]["config_section"]

    config = moe.mcore_json("config", "show", "--json", "--moe.num-experts", "8")
    assert config["moe"]["num_experts"] == 8


def test_mcore_ssm_pulls_its_chain_and_nothing_else(ssm, wheels, ours_installed) -> None:
    chain = {"mcore-core", "mcore-parallel", "mcore-models", "mcore-ssm"}

    assert ours_installed(ssm) == chain  # MoE layers are the [moe] extra's
    for name in chain:
        assert ssm.source_of(name) == wheels[name].as_uri()
    # The Triton kernels are the [triton] extra's; torch's own CUDA build may bring Triton.
    assert "triton" not in ssm.distributions() or "triton" in ssm.requirement_closure("torch")


def test_mcore_ssm_plugins_list_its_layer_symbols_and_a_hybrid_model_runs(ssm) -> None:
    report = ssm.mcore_json("plugins", "--json")

    plugins = {p["name"]: p for p in report["plugins"]}
    assert set(plugins) == {"mcore-core", "mcore-parallel", "mcore-models", "mcore-ssm"}
    assert report["failed"] == []
    components = plugins["mcore-ssm"]["components"]
    assert components["layer"] == ["G", "M"]
    assert components["mixer"] == ["gated_delta_net", "mamba"]
    assert "ssm" in components["config_section"]

    code = """
import torch
from mcore.models import TransformerConfig
from mcore.models.gpt import GPTModel
from mcore.ssm.config import SSMConfig
cfg = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=64,
                        hybrid_override_pattern="MG*")
ssm = SSMConfig(mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=4,
                linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                linear_value_head_dim=8)
ids = torch.randint(0, 64, (1, 8))
print(tuple(GPTModel(cfg, sections={"ssm": ssm})(ids).shape))
"""
    result = ssm.python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 8, 64)"

    # An MoE layer without mcore-moe installed: the error names the package to install.
    config = ssm.run("mcore", "config", "show", "--model.num-layers", "2",
                     "--model.hybrid-override-pattern", "ME")  # fmt: skip
    assert config.returncode != 0
    assert "layer symbol 'E' is not registered by any installed package: install mcore-moe" in (
        config.stderr
    )
