"""Vocab-parallel cross-entropy equals ``F.cross_entropy(reduction="none")`` on the full logits,
loss and gradient, with label smoothing and ignored targets, for TP 1, 2 and 4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcore.core.testing import run_ranks
from mcore.parallel import ParallelState, vocab_parallel_cross_entropy

S, B, V = 6, 3, 16
CASES = [  # (label_smoothing, ignore_index)
    (0.0, -100),
    (0.1, -100),
    (0.2, 5),  # the ignored id is a real vocabulary entry, owned by one rank
]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # Not torch.testing.assert_close inside ranks: with torch.distributed initialized it imports
    # torch.distributed.tensor (and sympy), seconds in every forked rank.
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{what}: max abs error {err:.3g}"


def _problem(ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits [s, b, V], targets [s, b] with some ignored, and an upstream loss grad."""
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(S, B, V, generator=gen)
    target = torch.randint(0, V, (S, B), generator=gen)
    target[0, 0] = target[3, 2] = ignore_index
    return logits, target, torch.rand(S, B, generator=gen)


def _oracle(logits, target, grad, label_smoothing, ignore_index):
    logits = logits.clone().requires_grad_()
    loss = F.cross_entropy(
        logits.flatten(0, 1),
        target.flatten(),
        reduction="none",
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    ).view(S, B)
    (loss * grad).sum().backward()
    return loss.detach(), logits.grad


def _check(tp_group, tp_size: int, tp_rank: int) -> None:
    for eps, ignore in CASES:
        what = f"tp={tp_size} label_smoothing={eps} ignore_index={ignore}"
        logits, target, grad = _problem(ignore)
        want_loss, want_dlogits = _oracle(logits, target, grad, eps, ignore)
        local = logits.chunk(tp_size, dim=-1)[tp_rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            local, target, tp_group=tp_group, label_smoothing=eps, ignore_index=ignore
        )
        (loss * grad).sum().backward()
        _assert_close(loss, want_loss, f"loss, {what}")
        assert (loss[target == ignore] == 0).all()
        _assert_close(local.grad, want_dlogits.chunk(tp_size, dim=-1)[tp_rank], f"grad, {what}")


def _check_ranks(rank: int, world_size: int) -> None:
    for tp in (2, 4):
        state = ParallelState(tp=tp)
        _check(state.tp_group, state.tp_size, state.tp_rank)


def test_matches_torch_cross_entropy_on_two_and_four_ranks() -> None:
    run_ranks(_check_ranks, 4, backend="gloo")


def test_matches_torch_cross_entropy_in_one_process() -> None:
    _check(None, 1, 0)


def test_low_precision_logits_give_an_fp32_loss_and_a_gradient_in_their_dtype() -> None:
    logits, target, _ = _problem(-100)
    local = logits.bfloat16().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target)
    assert loss.dtype == torch.float32
    want = F.cross_entropy(
        logits.bfloat16().float().flatten(0, 1), target.flatten(), reduction="none"
    )
    _assert_close(loss, want.view(S, B), "bf16 logits")
    loss.sum().backward()
    assert local.grad.dtype == torch.bfloat16


def test_backward_runs_once_and_shapes_are_checked() -> None:
    logits, target, _ = _problem(-100)
    logits.requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once per forward"):
        loss.backward()
    with pytest.raises(ValueError, match=r"logits \(6, 3, 16\) and target \(3, 6\) disagree"):
        vocab_parallel_cross_entropy(logits, target.t())
