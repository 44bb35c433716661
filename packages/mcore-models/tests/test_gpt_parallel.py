"""Features with no Hugging Face counterpart here (MLA, LayerNorm/GeLU, learned positions)
under tensor and sequence parallelism equal the same global model on one process."""

from __future__ import annotations

import pytest
import torch

from mcore.core.testing import run_ranks
from mcore.models import GPTModel, TransformerConfig
from mcore.parallel import ParallelState

CONFIGS = {
    "mla": dict(
        multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=8,
        qk_pos_emb_head_dim=8, v_head_dim=12,
    ),
    "mla_no_q_lora": dict(
        multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8,
        v_head_dim=8,
    ),
    "layernorm_gelu_learned_pos_bias": dict(
        normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
        add_bias_linear=True, add_qkv_bias=True, untie_embeddings_and_output_weights=True,
    ),
}  # fmt: skip


def config(name: str) -> TransformerConfig:
    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=96,
        vocab_size=128,
        max_position_embeddings=64,
        **CONFIGS[name],
    )


def batch():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, 128, (2, 16), generator=g),
        torch.randint(0, 128, (2, 16), generator=g),
    )


def run_model(model: GPTModel, ids, labels):
    logits = model(ids).detach()
    loss = model(ids, labels=labels)
    loss.mean().backward()
    model.reduce_partial_grads()
    return logits, loss.detach()


def local_expectation(model: GPTModel, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full single-process tensor for parameter ``name``."""
    owner, attr = name.rsplit(".", 1)
    module = model.get_submodule(owner)
    shard = getattr(module, f"shard_{attr}", None)
    return shard(full) if shard is not None else full


def _ranks(rank, world, name, sp, reference_grads):
    torch.manual_seed(0)  # the same global model on every TP size
    model = GPTModel(config(name), ParallelState(tp=world), sequence_parallel=sp)
    ids, labels = batch()
    logits, loss = run_model(model, ids, labels)
    mismatched = []
    for pname, p in model.named_parameters():
        expected = local_expectation(model, pname, reference_grads[pname])
        if not torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6):
            mismatched.append((pname, (p.grad - expected).abs().max().item()))
    return logits, loss, mismatched


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_equals_one_process(name, sp) -> None:
    torch.manual_seed(0)
    reference = GPTModel(config(name))
    ids, labels = batch()
    logits, loss = run_model(reference, ids, labels)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for rank_logits, rank_loss, mismatched in run_ranks(_ranks, 2, name, sp, grads, backend="gloo"):
        torch.testing.assert_close(rank_logits, logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rank_loss, loss, rtol=1e-4, atol=1e-5)
        assert mismatched == []
