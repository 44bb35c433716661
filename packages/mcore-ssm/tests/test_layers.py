"""The ``M`` and ``G`` layers in a model: what each ``[ssm]`` knob does, packed rows, meta
construction, and the Triton switch (under the interpreter, in a child process)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mcore.models import TransformerConfig
from mcore.models.gpt import GPTModel
from mcore.models.packing import PackedSeqParams
from mcore.ssm.config import SSMConfig

SSM = SSMConfig(
    mamba_head_dim=8,
    mamba_num_groups=2,
    mamba_state_dim=4,
    mamba_chunk_size=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_chunk_size=8,
)


def model(pattern: str = "MG*-", seed: int = 0, **ssm: object) -> GPTModel:
    cfg = TransformerConfig(
        num_layers=len(pattern), hidden_size=32, num_attention_heads=4, vocab_size=64,
        hybrid_override_pattern=pattern,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPTModel(cfg, sections={"ssm": dataclasses.replace(SSM, **ssm)})


IDS = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))


def test_chunk_size_changes_memory_not_results() -> None:
    small = model(mamba_chunk_size=4, linear_chunk_size=4)(IDS)
    large = model(mamba_chunk_size=32, linear_chunk_size=32)(IDS)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-5)


def test_sizes_and_biases_follow_the_section() -> None:
    mixer = model("M", mamba_num_heads=6, mamba_num_groups=3).layers["0"].mixer
    assert mixer.local_heads == 6 and mixer.A_log.shape == (6,)
    # in_proj: z and x (6 heads x 8), B and C (3 groups x 4), dt (6)
    assert mixer.in_proj.weight.shape == (2 * 48 + 2 * 12 + 6, 32)
    assert mixer.conv1d.bias is not None and mixer.in_proj.bias is None
    plain = model("M", mamba_conv_bias=False, mamba_proj_bias=True).layers["0"].mixer
    assert plain.conv1d.bias is None and plain.in_proj.bias is not None
    assert model("M", mamba_expand=1).layers["0"].mixer.local_heads == 32 // 8
    assert model("M", mamba_conv_kernel=2).layers["0"].mixer.conv1d.weight.shape[-1] == 2
    gdn = model("G", linear_conv_kernel_dim=3).layers["0"].mixer
    assert gdn.conv1d.weight.shape == (2 * 16 + 32, 1, 3)
    assert gdn.in_proj_qkvz.weight.shape == (2 * 16 + 2 * 32, 32)


def test_time_steps_start_in_their_range_and_are_clamped() -> None:
    mixer = model("M", mamba_dt_min=0.01, mamba_dt_max=0.02).layers["0"].mixer
    gdn = model("G", mamba_dt_min=0.01, mamba_dt_max=0.02).layers["0"].mixer
    for dt in (F.softplus(mixer.dt_bias.detach()), F.softplus(gdn.dt_bias.detach())):
        assert bool(((dt >= 0.01 - 1e-6) & (dt <= 0.02 + 1e-6)).all())
    raw = torch.full((3, mixer.local_heads), -20.0)
    with torch.no_grad():
        assert float(mixer._time_step(raw).min()) < 1e-6
    limited = model("M", mamba_dt_limit_min=0.05, mamba_dt_limit_max=0.06).layers["0"].mixer
    with torch.no_grad():
        steps = limited._time_step(torch.randn(3, limited.local_heads) * 10)
    assert float(steps.min()) == pytest.approx(0.05) and float(steps.max()) == pytest.approx(0.06)


def test_a_packed_row_computes_what_its_sequences_compute_alone() -> None:
    net = model("MG*-")
    a, b = IDS[0, :13], IDS[1, :8]
    packed = PackedSeqParams.from_lengths([13, 8])
    together = net(torch.cat([a, b])[None], position_ids=packed.position_ids(),
                   packed_seq_params=packed)  # fmt: skip
    alone = torch.cat([net(a[None]), net(b[None])], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_one_seed_gives_one_model_and_meta_builds_allocate_nothing() -> None:
    first, second = model(seed=3), model(seed=3)
    for (name, p), q in zip(first.named_parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    with torch.device("meta"):
        meta = model(seed=3)
    assert all(p.is_meta for p in meta.parameters())


def test_context_parallel_is_refused_naming_the_field() -> None:
    from types import SimpleNamespace

    from mcore.ssm.mamba import refuse_context_parallel

    ctx = SimpleNamespace(parallel_state=SimpleNamespace(cp_size=2))
    with pytest.raises(ValueError, match=r"set parallel.context_parallel_size = 1 \(it is 2\)"):
        refuse_context_parallel(ctx, "Mamba (M)")


def test_triton_kernels_give_the_torch_model_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    # Triton picks the interpreter when a kernel is defined: a fresh process decides it.
    code = (
        "import torch\n"
        "from test_layers import IDS, model\n"
        "sizes = dict(mamba_chunk_size=16, linear_chunk_size=16)\n"
        "fused, reference = model(ssm_kernel='triton', **sizes)(IDS), model(**sizes)(IDS)\n"
        "torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)\n"
        "print('same')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("same")


def test_plan_counts_the_mixers_matmuls() -> None:
    from mcore.parallel.plan.flops import mixer_flops

    net = model("MG")
    cfg, seq = net.config, 64
    for symbol, layer in (("M", net.layers["0"]), ("G", net.layers["1"])):
        mixer = layer.mixer
        weights = sum(
            m.weight.numel() for m in mixer.modules() if isinstance(m, torch.nn.Module)
            and type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
        )  # fmt: skip
        conv = mixer.conv1d.weight.numel()
        extra = mixer_flops(cfg, SSM, symbol, seq) / 2 - weights - conv  # the scan's share
        assert 0 < extra < weights, symbol
    assert mixer_flops(cfg, SSM, "*", seq) == 0.0 and mixer_flops(cfg, None, "M", seq) == 0.0
