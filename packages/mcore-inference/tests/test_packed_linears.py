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
