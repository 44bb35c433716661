"""Linear layers on oneDNN-packed weights compute what ``F.linear`` does, follow in-place weight
changes, stay out of autograd, and leave the engine's greedy generations equal to
transformers'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcore.inference import SamplingParams
from mcore.inference.packed_linears import (
    PackedLinear,
    pack_linears,
    packing_available,
    unpack_linears,
)
from mcore.parallel import ColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN")


def test_a_packed_layer_computes_f_linear_and_follows_its_weight() -> None:
    torch.manual_seed(0)
    column = ColumnParallelLinear(96, 160, bias=True)
    row = RowParallelLinear(160, 96, bias=True)
    x = torch.randn(12, 1, 96)
    with torch.inference_mode():
        want = row(column(x))
    assert pack_linears(torch.nn.Sequential(column, row), min_elements=0) == 2
    with torch.inference_mode():
        torch.testing.assert_close(row(column(x)), want, rtol=1e-5, atol=1e-5)
        column.weight.mul_(-0.5)  # a refit copies into the weights in place
        torch.testing.assert_close(
            column(x), F.linear(x, column.weight, column.bias), rtol=1e-5, atol=1e-5
        )
    unpack_linears(torch.nn.Sequential(column, row))
    assert column.kernel is None and row.kernel is None


def test_with_autograd_or_one_row_the_layer_runs_f_linear(monkeypatch) -> None:
    kernel = PackedLinear()
    weight = torch.nn.Parameter(torch.randn(64, 32))
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a))
    out = kernel(torch.randn(8, 32), weight, None)  # grad on: trainable output, no oneDNN
    assert out.requires_grad and not calls
    with torch.inference_mode():
        kernel(torch.randn(1, 32), weight, None)  # one row: the BLAS's matrix-vector path
        assert not calls
        kernel(torch.randn(2, 32), weight, None)  # two rows and more: oneDNN
    assert len(calls) == 1


def test_packed_engine_generates_what_transformers_does(
    llama_engine_factory, hf_dirs, hf_greedy, random_prompts
) -> None:
    engine = llama_engine_factory()
    assert engine.runner.packed_linears == 0  # the tiny model is below the size worth packing
    assert pack_linears(engine.model, min_elements=0) > 0
    hf = hf_dirs["llama"][1]
    prompts = random_prompts([5, 19, 33, 12, 7], hf.config.vocab_size)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, greedy), strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 8)


class _CountingBackend:
    """A ``linear_backend`` a plugin might register: every layer runs ``F.linear`` through it,
    and it counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, layer):
        def kernel(x, weight, bias):
            self.calls += 1
            return F.linear(x, weight, bias)

        return kernel


def test_inference_linear_backend_picks_the_registry_entry(llama_engine_factory) -> None:
    from mcore.core import hookimpl, register_plugin, unregister_plugin
    from mcore.inference.errors import InvalidRequestError

    prompts = [[5, 9, 2, 7], [3, 3, 8]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    plain = llama_engine_factory(linear_backend="torch")
    assert plain.runner.linear_backend == "torch" and plain.runner.packed_linears == 0
    assert all(
        m.kernel is None
        for m in plain.model.modules()
        if isinstance(m, ColumnParallelLinear | RowParallelLinear)
    )
    want = [o.token_ids for o in plain.generate(prompts, params)]
    assert llama_engine_factory().runner.linear_backend == "onednn_packed"  # auto, CPU fp32

    counting = _CountingBackend()

    class Plugin:
        @hookimpl
        def mcore_register(self, registry):
            registry.add("linear_backend", "counting", counting)

    name = register_plugin(Plugin(), name="counting-linears").name
    try:
        engine = llama_engine_factory(linear_backend="counting")
        assert engine.runner.packed_linears > 0
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
        assert counting.calls > 0
    finally:
        unregister_plugin(name)
    with pytest.raises(InvalidRequestError, match="inference.linear_backend") as error:
        llama_engine_factory(linear_backend="no_such_backend")
    assert error.value.field == "linear_backend"
