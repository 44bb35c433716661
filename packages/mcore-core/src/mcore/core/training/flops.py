"""Model FLOPs per token and MFU (model FLOPs utilisation) of a GPT.

A multiply-add counts as two FLOPs. Training counts as three forward passes (forward, and a
backward that computes both input and weight gradients); activation recomputation is not
counted, since MFU measures useful model work, not what the hardware happened to execute.

Attention scores (``Q Kᵀ``) and the weighted sum of values (``softmax · V``) are counted over
the full ``seq_length x seq_length`` matrix by default, as Megatron-LM and the PaLM paper do,
so MFU compares with published numbers; ``causal=True`` halves them to the work a causal
kernel (flash attention) actually does.
"""

from __future__ import annotations

from typing import Any


def gpt_flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    vocab_size: int,
    seq_length: int,
    gated_mlp: bool = True,
    *,
    causal: bool = False,
) -> float:
    """Training FLOPs per token of a decoder-only transformer (3 x forward).

    Per layer: the Q, K and V projections (K and V are ``num_query_groups`` heads wide under
    GQA), the output projection, attention scores and values, and the MLP (three matrices
    when ``gated_mlp``, as in SwiGLU; two otherwise). Plus the LM head. Norms, softmax,
    activations and embeddings lookups are left out: they are not matmuls.
    """
    if num_attention_heads % num_query_groups:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_query_groups ({num_query_groups})"
        )
    h = hidden_size
    kv_width = h * num_query_groups // num_attention_heads
    qkv = 2 * h * (h + 2 * kv_width)
    out_proj = 2 * h * h
    scores_and_values = 2 * 2 * seq_length * h * (0.5 if causal else 1.0)
    mlp = 2 * (3 if gated_mlp else 2) * h * ffn_hidden_size
    lm_head = 2 * h * vocab_size
    forward = num_layers * (qkv + out_proj + scores_and_values + mlp) + lm_head
    return 3.0 * forward


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation as a fraction of ``peak_flops`` (0.42 means 42 %).

    Per device: pass one device's throughput and its peak, or the whole job's throughput and
    the peak times the number of devices.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s. More specific
# names come first: "H100 PCIe" must not match the SXM entry.
_PEAK_BF16: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989e12),
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("A100",), 312e12),
]


def peak_flops_of(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its CUDA name; None for a GPU not in the table."""
    for parts, peak in _PEAK_BF16:
        if all(part.lower() in device_name.lower() for part in parts):
            return peak
    return None


def peak_flops(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA ``device`` (default: the current one).

    None on CPU, without CUDA, or for a GPU this table does not know: MFU is then not shown.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))
