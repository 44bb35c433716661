"""A third-party plugin, examples/custom-router-plugin, works as its README promises.

Its wheel is built in its own folder and installed next to the mcore-core wheel in a fresh venv:
the plugin author's and the user's whole experience, with nothing from this workspace on the path.
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

    Router = get_registry("router").get("example_random")
    router = Router(num_experts=8, topk=2, seed=1234)
    probs, indices = router(torch.randn(16, 32))
    same_seed = Router(num_experts=8, topk=2, seed=1234)(torch.randn(16, 32))[1]

    print(json.dumps({
        "class": f"{Router.__module__}.{Router.__qualname__}",
        "is_module": isinstance(router, torch.nn.Module),
        "probs_shape": list(probs.shape),
        "indices_shape": list(indices.shape),
        "indices_dtype": str(indices.dtype),
        "indices": indices.tolist(),
        "probs": probs.tolist(),
        "reproducible": torch.equal(indices, same_seed),
    }))
    """
)


@pytest.fixture(scope="module")
def venv(make_venv, example_plugin_wheel):
    return make_venv("mcore-core", example_plugin_wheel)


def test_mcore_plugins_lists_the_example_router(venv) -> None:
    report = venv.mcore_json("plugins", "--json")

    plugins = {p["name"]: p for p in report["plugins"]}
    assert set(plugins) == {"mcore-core", "example-router"}
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
    assert routed["is_module"]
    assert routed["probs_shape"] == routed["indices_shape"] == [16, 2]
    assert routed["indices_dtype"] == "torch.int64"
    for experts in routed["indices"]:
        assert all(0 <= e < 8 for e in experts)
        assert len(set(experts)) == 2, "a token must go to two different experts"
    assert all(p == 0.5 for row in routed["probs"] for p in row)
    assert routed["reproducible"], "the same seed must route the same way"


def test_mcore_load_plugins_hides_the_example(venv) -> None:
    report = venv.mcore_json("plugins", "--json", MCORE_LOAD_PLUGINS="mcore-core")

    assert [p["name"] for p in report["plugins"]] == ["mcore-core"]
    assert report["not_loaded"] == ["example-router"]
