"""Tiny Nemotron-H and Qwen3-Next models from transformers configs (random weights, no
downloads): the numerical oracles of mcore-ssm's tests, shared by its import, export and serving
tests.

Nemotron-H: layers ``M E * -`` with 2 Mamba groups, head sizes that are neither powers of two
nor hidden / heads, projection biases, grouped sigmoid routing with a score bias and a scaling
factor. Qwen3-Next: HF layers (GDN + MoE, gated attention + MoE, GDN + dense MLP), i.e. mcore
``G E * E G -``, partial rotary, un-normalised softmax top-k and a gated shared expert.
"""

from __future__ import annotations

from pathlib import Path

import torch

CASES = {
    "nemotron_h": (
        "NemotronHConfig",
        dict(
            vocab_size=64, hidden_size=32, initializer_range=0.1,
            layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=40,
            mamba_num_heads=4, mamba_head_dim=6, n_groups=2, ssm_state_size=8, chunk_size=8,
            use_bias=True, mamba_proj_bias=True, time_step_min=0.01,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
            moe_shared_expert_intermediate_size=20, n_group=2, topk_group=1,
            routed_scaling_factor=1.5, norm_topk_prob=True,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            vocab_size=64, hidden_size=32, initializer_range=0.1, num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            mlp_only_layers=[2], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=40, rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                   "partial_rotary_factor": 0.5},
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=6, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=24, shared_expert_intermediate_size=20, norm_topk_prob=False,
        ),
    ),
}  # fmt: skip


def make_hf(case: str, folder: str | Path, **config_overrides: object):
    """Save the tiny random transformers model ``case`` to ``folder``; returns it (fp32, eval).

    transformers initialises norms, biases and per-head vectors to constants; noise on every
    1-D tensor makes a misplaced row or a mixed-up block visible in a comparison."""
    import transformers

    config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**extra, **config_overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if p.dim() == 1 and "inv_freq" not in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return model
