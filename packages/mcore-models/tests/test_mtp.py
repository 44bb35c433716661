"""Multi-token prediction in ``GPTModel``: what each depth sees and predicts, the loss it adds
to backward, and packed sequences and loss masks that it honours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcore.core import ConfigError
from mcore.models import GPTModel, PackedSeqParams, TransformerConfig
from mcore.models.mtp import mtp_targets

VOCAB = 64


def _model(depth: int = 2, **overrides) -> GPTModel:
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, vocab_size=VOCAB, mtp_num_layers=depth, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPTModel(config)


def test_depth_k_sees_tokens_up_to_t_plus_k_and_predicts_t_plus_k_plus_1() -> None:
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    before = model.mtp_logits(ids)
    t = 4
    for k, logits in enumerate(before, start=1):
        later = ids.clone()
        later[0, t + k + 1] = (later[0, t + k + 1] + 1) % VOCAB  # a token depth k must not see
        seen = ids.clone()
        seen[0, t + k] = (seen[0, t + k] + 1) % VOCAB  # the token depth k embeds at t
        assert torch.equal(model.mtp_logits(later)[k - 1][0, : t + 1], logits[0, : t + 1])
        assert not torch.allclose(model.mtp_logits(seen)[k - 1][0, t], logits[0, t])


def test_the_mtp_loss_reaches_backward_scaled_and_the_lm_loss_is_returned() -> None:
    """Gradients of ``model(ids, labels).mean()`` (aux scale 1) equal those of the LM mean
    plus factor x the mean over depths of each depth's mean cross entropy."""
    factor = 0.25
    model = _model(mtp_loss_scaling_factor=factor)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(ids, -1, dims=1)
    model.mtp.aux_loss_scale = 1.0
    lm = model(ids, labels=labels)
    lm.mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    reference = F.cross_entropy(
        model(ids).reshape(-1, VOCAB), labels.reshape(-1), reduction="none"
    ).view_as(lm)
    assert torch.allclose(lm, reference, atol=1e-5)
    depth_means = []
    for k, logits in enumerate(model.mtp_logits(ids), start=1):
        n = ids.shape[1] - k  # the last k positions have no target
        ce = F.cross_entropy(
            logits[:, :n].reshape(-1, VOCAB), mtp_targets(labels, k)[:, :n].reshape(-1)
        )
        depth_means.append(ce)
    (reference.mean() + factor * torch.stack(depth_means).mean()).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6), name
    assert any(got[n].abs().sum() > 0 for n in got if n.startswith("mtp."))
    stats = model.mtp.read_statistics()
    assert sorted(stats) == ["mtp_1_loss", "mtp_2_loss"]
    assert float(stats["mtp_1_loss"][0]) == pytest.approx(float(depth_means[0].detach()), rel=1e-5)


def test_packed_sequences_predict_within_themselves_and_masked_targets_do_not_count() -> None:
    model = _model(depth=1)
    lengths = (6, 5)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    params = PackedSeqParams.from_lengths(lengths, total=12)
    ids = torch.cat([*seqs, torch.zeros(1, dtype=torch.long)]).unsqueeze(0)
    (packed,) = model.mtp_logits(ids, params.position_ids(), params)
    start = 0
    for seq in seqs:
        (alone,) = model.mtp_logits(seq.unsqueeze(0))
        n = len(seq) - 1  # positions whose shifted token lies inside the sequence
        assert torch.allclose(packed[0, start : start + n], alone[0, :n], atol=1e-5)
        start += len(seq)

    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones_like(ids)
    loss_mask[0, 3] = 0  # depth 1's target at position 2 is labels[3]: position 2 drops out
    model(ids, params.position_ids(), labels, params, loss_mask=loss_mask)
    (total, count) = model.mtp.read_statistics()["mtp_1_loss"]
    ce = F.cross_entropy(packed[0], mtp_targets(labels, 1)[0], reduction="none").detach()
    counted = [t for t in range(5)] + [t for t in range(6, 10)]  # within each sequence
    counted.remove(2)
    assert count == 1
    assert float(total) == pytest.approx(float(ce[counted].mean()), rel=1e-5)


def test_hybrid_pattern_blocks_are_the_depths() -> None:
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
        hybrid_override_pattern="*-/*-/-",
    )  # fmt: skip
    model = GPTModel(config)
    blocks = [[type(m).__name__ for m in layer.block] for layer in model.mtp.layers]
    assert blocks == [["TransformerLayer"] * 2, ["TransformerLayer"]]
    assert model.mtp.layers[0].block[0].self_attention is not None
    assert model.mtp.layers[1].block[0].self_attention is None
    numbers = [m.layer_number for layer in model.mtp.layers for m in layer.block]
    assert numbers == [2, 3, 4]  # after the main stack's, unique (the KV cache keys by them)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mtp_loss_scaling_factor": 0.1}, "mtp_loss_scaling_factor: is set"),
        (
            {"hybrid_override_pattern": "*-/*-", "mtp_num_layers": 2},
            "mtp_num_layers: is 2, but hybrid_override_pattern has 1",
        ),
    ],
)
def test_bad_mtp_fields_are_named(fields, message) -> None:
    config = TransformerConfig(num_layers=2, vocab_size=VOCAB, **fields)
    with pytest.raises(ConfigError, match=message):
        config.checked()


def test_a_model_without_mtp_refuses_mtp_logits() -> None:
    model = _model(depth=0)
    assert model.mtp is None
    with pytest.raises(ValueError, match="no multi-token-prediction depths"):
        model.mtp_logits(torch.zeros(1, 4, dtype=torch.long))
