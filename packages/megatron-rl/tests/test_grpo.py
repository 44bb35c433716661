"""Every GRPO option against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.grpo import (
    GRPOLossConfig,
    group_advantages,
    grpo_token_loss,
    kl_penalty,
    token_logprobs,
    token_loss_weights,
    zero_variance_groups,
)

LOG = math.log


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_group_advantages_with_and_without_std_normalisation() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    # Row 0: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 * sqrt(3). Row 2: mean 0.75, std 1.5.
    grpo = group_advantages(rewards, epsilon=0.0)
    s3 = 0.5 * math.sqrt(3)
    expected = [[s3, -s3, -s3, s3], [0.0, 0.0, 0.0, 0.0], [1.5, -0.5, -0.5, -0.5]]
    assert torch.allclose(grpo[[0, 2]], torch.tensor(expected)[[0, 2]], atol=1e-6)
    assert torch.equal(grpo[1], torch.zeros(4))  # a flat group is 0, not 0 / 0
    assert torch.equal(group_advantages(rewards)[1], torch.zeros(4))
    dr = group_advantages(rewards, normalize_by_std=False)  # Dr.GRPO: only centred
    expected_dr = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [2.25, -0.75, -0.75, -0.75]]
    assert torch.allclose(dr, torch.tensor(expected_dr))
    eps = group_advantages(rewards[:1], epsilon=0.5)
    assert eps[0, 0].item() == pytest.approx(0.5 / (1 / math.sqrt(3) + 0.5))
    assert zero_variance_groups(rewards).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3, 1))


def test_kl_estimators() -> None:
    # pi = 0.5, pi_ref = 0.25: log(pi / pi_ref) = log 2.
    logp, ref = t(LOG(0.5)), t(LOG(0.25))
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(LOG(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * LOG(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + LOG(2))  # r - 1 - log r
    # Where pi < pi_ref, k1 is negative; k2 and k3 never are.
    assert kl_penalty(ref, logp, "k1").item() == pytest.approx(-LOG(2))
    assert kl_penalty(ref, logp, "k3").item() == pytest.approx(2 - 1 - LOG(2))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def ratio_case(ratio: list[float], advantages: list[float], config: GRPOLossConfig):
    old = torch.zeros(len(ratio), dtype=torch.float64)
    logp = torch.tensor([LOG(r) for r in ratio], dtype=torch.float64, requires_grad=True)
    out = grpo_token_loss(logp, old, torch.tensor(advantages, dtype=torch.float64), config)
    out.loss.sum().backward()
    return out, logp.grad


def test_clipped_ratio_with_separate_low_and_high_clip() -> None:
    config = GRPOLossConfig(clamp_eps_lower=0.1, clamp_eps_upper=0.3)
    ratio = [1.5, 0.5, 0.5, 1.5, 1.1]
    adv = [1.0, 1.0, -1.0, -1.0, 2.0]
    out, grad = ratio_case(ratio, adv, config)
    # A > 0: min(r, 1.3) * A; A < 0: max(r, 0.9) * |A| (as losses: the negated objective).
    assert out.loss.tolist() == pytest.approx([-1.3, -0.5, 0.9, 1.5, -2.2])
    assert out.clipped.tolist() == [True, False, True, False, False]
    # The gradient flows only where the ratio was not clipped: d(-A r)/d log r = -A r.
    assert grad.tolist() == pytest.approx([0.0, -0.5, 0.0, 1.5, -2.2])


def test_dual_clip_caps_the_loss_of_negative_advantages() -> None:
    config = GRPOLossConfig(dual_clip_c=3.0)
    out, grad = ratio_case([5.0, 5.0, 2.0], [-1.0, 1.0, -1.0], config)
    # ratio 5, A = -1: max(5, 1.2) = 5 is capped at c |A| = 3, with no gradient.
    assert out.loss.tolist() == pytest.approx([3.0, -1.2, 2.0])
    assert out.clipped.tolist() == [True, True, False]
    assert grad.tolist() == pytest.approx([0.0, 0.0, 2.0])
    plain, _ = ratio_case([5.0], [-1.0], GRPOLossConfig())
    assert plain.loss.item() == pytest.approx(5.0)


def test_truncated_importance_sampling_correction() -> None:
    config = GRPOLossConfig(importance_sampling_correction=True, importance_sampling_cap=2.0)
    logp = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    old = torch.zeros(3, dtype=torch.float64)
    # pi_old / pi_rollout = 3 (capped at 2), 0.5, 1.
    rollout = t(-LOG(3), LOG(2), 0.0)
    out = grpo_token_loss(logp, old, t(1.0, 1.0, -2.0), config, rollout_logp=rollout)
    assert out.importance_weight.tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert out.truncated.tolist() == [True, False, False]
    assert out.loss.tolist() == pytest.approx([-2.0, -0.5, 2.0])
    out.loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-2.0, -0.5, 2.0])  # the weight is a constant
    with pytest.raises(ValueError, match="rollout_logp"):
        grpo_token_loss(logp, old, t(1.0, 1.0, 1.0), config)


def test_kl_penalty_and_entropy_bonus_join_the_loss() -> None:
    config = GRPOLossConfig(kl_beta=0.1, kl_estimator="k3", entropy_coeff=0.01)
    logp, old = t(LOG(0.5)), t(LOG(0.5))
    out = grpo_token_loss(
        logp, old, t(2.0), config, ref_logp=t(LOG(0.25)), entropy=t(1.5)
    )  # ratio 1: policy term -2
    assert out.loss.item() == pytest.approx(-2.0 + 0.1 * (0.5 - 1 + LOG(2)) - 0.01 * 1.5)
    assert out.kl.item() == pytest.approx(0.5 - 1 + LOG(2))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_loss(logp, old, t(2.0), config, entropy=t(1.5))
    with pytest.raises(ValueError, match="entropy"):
        grpo_token_loss(logp, old, t(2.0), config, ref_logp=t(0.0))


def test_loss_aggregation_weights() -> None:
    masks = [torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0])]
    token = token_loss_weights(masks, "token_mean")
    assert [w.tolist() for w in token] == [[0.25, 0.25, 0.25, 0.0], [0.0, 0.25]]
    seq = token_loss_weights(masks, "seq_mean_token_mean")
    assert seq[0].tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.0])
    assert seq[1].tolist() == [0.0, 0.5]
    dr = token_loss_weights(masks, "dr_grpo", max_completion_tokens=4)
    assert [w.tolist() for w in dr] == [[0.125, 0.125, 0.125, 0.0], [0.0, 0.125]]
    # The three on per-token losses 1, 2, 3 | 4: means 2.5, (2 + 4) / 2 = 3, and 10 / 8.
    losses = [torch.tensor([1.0, 2.0, 3.0, 9.0]), torch.tensor([9.0, 4.0])]
    total = [
        sum(float((w * x).sum()) for w, x in zip(ws, losses, strict=True))
        for ws in (token, seq, dr)
    ]
    assert total == pytest.approx([2.5, 3.0, 1.25])
    with pytest.raises(ValueError, match="max_completion_tokens"):
        token_loss_weights(masks, "dr_grpo")
    with pytest.raises(ValueError, match="token_sum"):
        token_loss_weights(masks, "token_sum")


def test_token_logprobs_temperature_padded_vocab_and_entropy() -> None:
    logits = torch.tensor([[LOG(1.0), LOG(3.0), 50.0]])  # the third id is vocabulary padding
    logp, entropy = token_logprobs(logits, torch.tensor([1]), vocab_size=2, with_entropy=True)
    assert logp.item() == pytest.approx(LOG(0.75))
    assert entropy.item() == pytest.approx(-(0.25 * LOG(0.25) + 0.75 * LOG(0.75)))
    # Temperature 2: softmax(log(1, 3) / 2) = (1, sqrt 3) / (1 + sqrt 3).
    hot, _ = token_logprobs(logits, torch.tensor([1]), vocab_size=2, temperature=2.0)
    assert hot.item() == pytest.approx(LOG(math.sqrt(3) / (1 + math.sqrt(3))))
