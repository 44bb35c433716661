"""The distillation losses against a hand computation on full logits, and on TP shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcore.core.testing import run_ranks
from mcore.distill.losses import balanced, hidden_state_loss, masked_mean, vocab_parallel_kl


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """sum_v p_t(v) (log p_t(v) - log p_s(v)) with p = softmax(logits / t), written out."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(-1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(-1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_and_its_gradient_equal_the_hand_computation(temperature) -> None:
    torch.manual_seed(0)
    student = torch.randn(5, 3, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 3, 11, dtype=torch.float64)
    ours = vocab_parallel_kl(student, teacher, temperature)
    assert ours.shape == (5, 3)
    torch.testing.assert_close(ours, _hand_kl(student, teacher, temperature))
    weights = torch.rand(5, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ours * weights).sum(), student)
    expected = torch.autograd.grad(
        (_hand_kl(student, teacher, temperature) * weights).sum(), student
    )[0]
    torch.testing.assert_close(grad, expected)
    # torch's own KL agrees too (it takes log-probabilities of the student).
    torch_kl = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(ours, torch_kl)


def _kl_on_shards(rank: int, world: int, student: torch.Tensor, teacher: torch.Tensor):
    import torch.distributed as dist

    part = student.shape[-1] // world
    mine = student[..., rank * part : (rank + 1) * part].clone().requires_grad_()
    theirs = teacher[..., rank * part : (rank + 1) * part]
    kl = vocab_parallel_kl(mine, theirs, 2.0, dist.group.WORLD)
    kl.sum().backward()
    return kl.detach(), mine.grad


def test_kl_on_vocabulary_shards_equals_the_whole() -> None:
    torch.manual_seed(1)
    student = torch.randn(4, 2, 16)
    teacher = torch.randn(4, 2, 16)
    whole = student.clone().requires_grad_()
    expected = vocab_parallel_kl(whole, teacher, 2.0)
    expected.sum().backward()
    results = run_ranks(_kl_on_shards, 2, student, teacher, backend="gloo")
    for kl, _ in results:
        torch.testing.assert_close(kl, expected.detach())  # every TP rank knows each token's KL
    grads = torch.cat([grad for _, grad in results], dim=-1)
    torch.testing.assert_close(grads, whole.grad)


def test_hidden_state_losses_mask_and_balance_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(hidden_state_loss(a, b, "cosine"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(hidden_state_loss(a, b, "mse"), torch.tensor([2.5, 1.0]))
    with pytest.raises(ValueError, match="unknown intermediate loss 'l1'"):
        hidden_state_loss(a, b, "l1")
    values, mask = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1])
    assert masked_mean(values, mask).item() == 2.5
    assert masked_mean(values, torch.zeros(3)).item() == 0.0
    term = torch.tensor(4.0, requires_grad=True)
    scaled = balanced(term, torch.tensor(2.0))
    assert scaled.item() == 2.0
    scaled.backward()
    assert term.grad.item() == 0.5  # the scale is a constant: the direction is unchanged
