"""A third-party plugin, examples/custom-router-plugin, works as its README promises.

Its wheel is built in its own folder and installed alone into a fresh venv, where it brings
mcore-moe and the rest from wheels of this checkout: the plugin author's and the user's whole
experience, with nothing from this workspace on the path.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = pytest.mark.slow

ROUTE_RANDOM_TOKENS = textwrap.dedent(
    """
    import json
    import torch
    from mcore.core import get_registry
    from mcore.models import ModelContext, TransformerConfig
    from mcore.moe import MoEConfig
    from mcore.moe.layer import MoELayer
    from mcore.moe.router import Router

    RandomRouter = get_registry("router").get("example_random")
    ctx = ModelContext(
        TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64),
        sections={"moe": MoEConfig(num_experts=8, router_topk=2, router_type="example_random")},
    )
    layer = MoELayer(ctx, layer_number=3)
    routed = layer.router(torch.randn(16, 32))
    again = RandomRouter(ctx, ctx.section("moe"), layer_number=3)(torch.randn(16, 32))
    out = layer(torch.randn(8, 2, 32))
    out.sum().backward()

    print(json.dumps({
        "class": f"{RandomRouter.__module__}.{RandomRouter.__qualname__}",
        "is_router": issubclass(RandomRouter, Router),
        "layer_router": type(layer.router).__qualname__,
        "probs_shape": list(routed.probs.shape),
        "indices_shape": list(routed.indices.shape),
        "indices_dtype": str(routed.indices.dtype),
        "indices": routed.indices.tolist(),
        "probs": routed.probs.tolist(),
        "reproducible": torch.equal(routed.indices, again.indices),
        "out_shape": list(out.shape),
        "experts_have_grads": layer.experts.linear_fc1.weight.grad is not None,
    }))
    """
)

# Loading every plugin must stay light: the example registers its router by import path.
LOAD_PLUGINS = textwrap.dedent(
    """
    import json, sys
    from mcore.core import get_plugin_manager

    get_plugin_manager()
    print(json.dumps({
        "torch": "torch" in sys.modules,
        "router_module": "mcore_example_router.router" in sys.modules,
    }))
    """
)


@pytest.fixture(scope="module")
def venv(make_venv, example_plugin_wheel):
    return make_venv(example_plugin_wheel)


def test_the_wheel_brings_mcore_moe_and_its_dependencies(venv, wheels) -> None:
    ours = set(wheels) & set(venv.distributions())

    assert ours == {"mcore-core", "mcore-parallel", "mcore-models", "mcore-moe"}


def test_mcore_plugins_lists_the_example_router(venv) -> None:
    report = venv.mcore_json("plugins", "--json")

    plugins = {p["name"]: p for p in report["plugins"]}
    assert set(plugins) == {
        "mcore-core", "mcore-parallel", "mcore-models", "mcore-moe", "example-router"
    }  # fmt: skip
    assert report["failed"] == []
    example = plugins["example-router"]
    assert example["package"] == "mcore-example-router"
    assert example["version"] == "0.1.0"
    assert example["components"] == {"router": ["example_random"]}


def test_the_router_comes_from_the_registry_and_routes(venv) -> None:
    result = venv.python(ROUTE_RANDOM_TOKENS)
    assert result.returncode == 0, result.stderr
    routed = json.loads(result.stdout)

    assert routed["class"] == "mcore_example_router.router.RandomRouter"
    assert routed["is_router"], "it must subclass mcore.moe.router.Router"
    assert routed["layer_router"] == "RandomRouter", "the MoE layer builds it by config name"
    assert routed["probs_shape"] == routed["indices_shape"] == [16, 2]
    assert routed["indices_dtype"] == "torch.int64"
    for experts in routed["indices"]:
        assert all(0 <= e < 8 for e in experts)
        assert len(set(experts)) == 2, "a token must go to two different experts"
    assert all(p == 0.5 for row in routed["probs"] for p in row)
    assert routed["reproducible"], "the same seed and layer must route the same way"
    assert routed["out_shape"] == [8, 2, 32]
    assert routed["experts_have_grads"]


def test_loading_plugins_imports_neither_torch_nor_the_router(venv) -> None:
    result = venv.python(LOAD_PLUGINS)
    assert result.returncode == 0, result.stderr

    assert json.loads(result.stdout) == {"torch": False, "router_module": False}


def test_mcore_train_selects_the_router_by_name(venv, tmp_path) -> None:
    result = venv.run(
        # This venv has no mcore-ckpt: the run saves no checkpoint.
        "mcore", "train", "--nproc", "1",
        "--moe.num-experts", "4", "--moe.router-type", "example_random",
        "--train.train-iters", "6", "--train.micro-batch-size", "2", "--train.seq-length", "32",
        "--train.device", "cpu", "--data.max-bytes", "100000",
        "--data.cache-dir", str(tmp_path / "cache"),
        "--model.num-layers", "2", "--model.hidden-size", "32",
        "--model.num-attention-heads", "4", "--model.ffn-hidden-size", "64",
        "--optimizer.lr", "1e-2", "--logger.log-interval", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [
        float(line.split("| loss ")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("step ")
    ]
    assert len(losses) == 6 and losses[-1] < losses[0]

    misspelt = venv.run(
        "mcore", "train", "--nproc", "1",
        "--moe.num-experts", "4", "--moe.router-type", "random",
    )  # fmt: skip
    assert misspelt.returncode == 2
    assert "unknown router 'random'" in misspelt.stderr


def test_mcore_load_plugins_hides_the_example(venv) -> None:
    report = venv.mcore_json("plugins", "--json", MCORE_LOAD_PLUGINS="mcore-core")

    assert [p["name"] for p in report["plugins"]] == ["mcore-core"]
    assert report["not_loaded"] == ["example-router", "mcore-models", "mcore-moe", "mcore-parallel"]
