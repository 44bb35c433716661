"""FLOPs per token against a hand count and the PaLM paper's formula; peaks and MFU."""

from __future__ import annotations

import pytest

from mcore.core.training.flops import gpt_flops_per_token, mfu, peak_flops, peak_flops_of

SMALL = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=256,
    num_attention_heads=8,
    num_query_groups=2,
    vocab_size=1000,
    seq_length=128,
)


def test_matches_a_hand_count() -> None:
    # head_dim 8, so K and V are 2 groups x 8 = 16 wide. Forward, per token, per layer:
    qkv = 2 * 64 * (64 + 16 + 16)  # 12288
    out_proj = 2 * 64 * 64  # 8192
    scores_and_values = 2 * 128 * 64 + 2 * 128 * 64  # 32768: Q·Kᵀ and P·V over 128 keys
    gated_mlp = 3 * 2 * 64 * 256  # 98304: gate, up and down
    lm_head = 2 * 64 * 1000  # 128000
    forward = 2 * (qkv + out_proj + scores_and_values + gated_mlp) + lm_head  # 431104
    assert gpt_flops_per_token(**SMALL) == 3 * forward == 1_293_312


def test_causal_halves_only_the_attention_matmuls() -> None:
    full = gpt_flops_per_token(**SMALL)
    causal = gpt_flops_per_token(**SMALL, causal=True)
    assert full - causal == 3 * 2 * (2 * 128 * 64)  # 3 x layers x half of 32768


def test_reduces_to_palms_6n_plus_12lht_for_plain_attention_and_mlp() -> None:
    # PaLM, appendix B: 6N + 12·L·H·Q·T with N the non-embedding parameters (LM head included)
    L, h, ffn, V, T = 4, 256, 1024, 5000, 512
    n_params = L * (4 * h * h + 2 * h * ffn) + h * V
    flops = gpt_flops_per_token(L, h, ffn, 16, 16, V, T, gated_mlp=False)
    assert flops == 6 * n_params + 12 * L * h * T


def test_mfu_is_a_fraction_of_peak() -> None:
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1000.0, 1e9, 0.0)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_device_name(name: str, peak: float | None) -> None:
    assert peak_flops_of(name) == peak


def test_no_peak_on_cpu() -> None:
    pytest.importorskip("torch")
    assert peak_flops("cpu") is None


def test_gqa_must_divide_heads() -> None:
    with pytest.raises(ValueError, match="multiple of num_query_groups"):
        gpt_flops_per_token(2, 64, 256, 8, 3, 1000, 128)
