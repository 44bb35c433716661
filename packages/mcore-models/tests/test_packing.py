"""Packed sequences compute exactly what each sequence computes alone.

Several sequences of different lengths share one row (plus padding); with their
``PackedSeqParams`` every sequence's logits, per-token losses and the weights' gradients equal
those of running the sequences one by one.
"""

from __future__ import annotations

import pytest
import torch

from mcore.models import GPTModel, PackedSeqParams, TransformerConfig

LENGTHS = (5, 3, 7)


def _model(mla: bool) -> GPTModel:
    extra = dict(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
                 v_head_dim=8) if mla else {}  # fmt: skip
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, ffn_hidden_size=48,
        **({} if mla else {"num_query_groups": 2}), **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPTModel(config)


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_packed_rows_equal_the_sequences_alone(mla: bool) -> None:
    model = _model(mla)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (n + 1,), generator=g) for n in LENGTHS]
    params = PackedSeqParams.from_lengths(LENGTHS, total=sum(LENGTHS) + 2)
    ids = torch.cat([s[:-1] for s in seqs] + [torch.zeros(2, dtype=torch.long)]).unsqueeze(0)
    labels = torch.cat([s[1:] for s in seqs] + [torch.zeros(2, dtype=torch.long)]).unsqueeze(0)
    assert params.cu_seqlens.tolist() == [0, 5, 8, 15]

    packed = model(ids, position_ids=params.position_ids(), labels=labels, packed_seq_params=params)
    packed[:, : sum(LENGTHS)].sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = [model(s[:-1].unsqueeze(0), labels=s[1:].unsqueeze(0)) for s in seqs]
    sum(a.sum() for a in alone).backward()

    torch.testing.assert_close(packed[0, : sum(LENGTHS)], torch.cat([a[0] for a in alone]))
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, msg=name)


def test_positions_restart_and_padding_attends_to_itself() -> None:
    params = PackedSeqParams.from_cu_seqlens([0, 2, 5], total=7)
    assert params.position_ids().tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    mask = params.attention_mask()[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False]
    assert mask[5].tolist() == [False] * 5 + [True, False]  # padding: itself only
    with pytest.raises(ValueError, match="cannot pack"):
        PackedSeqParams.from_lengths([4, 4], total=6)
