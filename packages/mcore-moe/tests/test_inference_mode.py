"""At inference an MoE layer drops no tokens, whatever its capacity factor says."""

from __future__ import annotations

import torch

from mcore.models import ModelContext, TransformerConfig
from mcore.models.inference import prepare_for_inference
from mcore.moe import MoEConfig
from mcore.parallel import ParallelState

HIDDEN = 16


def _layer(moe: MoEConfig):
    from mcore.moe.layer import MoELayer

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, vocab_size=32
    )
    torch.manual_seed(0)
    return MoELayer(ModelContext(config, ParallelState(), sections={"moe": moe}))


def test_inference_mode_routes_every_token_despite_capacity() -> None:
    x = torch.randn(12, 1, HIDDEN, generator=torch.Generator().manual_seed(1))
    unlimited = _layer(MoEConfig(num_experts=4, router_topk=2)).eval()
    capped = _layer(MoEConfig(num_experts=4, router_topk=2, expert_capacity_factor=0.25)).eval()
    with torch.no_grad():
        reference = unlimited(x)
        assert not torch.allclose(capped(x), reference)  # capacity drops tokens in eval too
        prepare_for_inference(capped)
        torch.testing.assert_close(capped(x), reference, rtol=0, atol=0)
