"""Point-to-point exchange between pipeline stages on real gloo ranks."""

from __future__ import annotations

import pytest
import torch

from mcore.core.testing import run_ranks
from mcore.parallel import P2PCommunicator, P2PShapeError, ParallelState

SHAPE = (4, 2, 3)


def _payload(stage: int, kind: int) -> torch.Tensor:
    """A tensor that says who sent it and whether it is an activation (0) or a gradient (1)."""
    return torch.full(SHAPE, 10.0 * stage + kind)


def _ring_rank(rank, world):
    ps = ParallelState(pp=world)
    comm = P2PCommunicator(ps.pp_group, tensor_shape=SHAPE, dtype=torch.float32, device="cpu")
    # Every stage at once sends an activation forward and a gradient backward around the
    # ring; with two stages both go to the same peer and must not be mixed up.
    from_prev, from_next = comm.exchange(
        send_next=_payload(comm.rank, 0),
        send_prev=_payload(comm.rank, 1),
        recv_prev=True,
        recv_next=True,
    )
    with pytest.raises(P2PShapeError, match=r"\(4, 2, 3\)"):
        comm.exchange(send_next=torch.zeros(4, 2, 5))
    return comm.rank, from_prev, from_next, from_prev.requires_grad


@pytest.mark.parametrize("stages", [2, 4])
def test_activations_and_gradients_reach_the_right_neighbour(stages) -> None:
    for stage, from_prev, from_next, needs_grad in run_ranks(_ring_rank, stages, backend="gloo"):
        assert torch.equal(from_prev, _payload((stage - 1) % stages, 0))
        assert torch.equal(from_next, _payload((stage + 1) % stages, 1))
        assert needs_grad  # the stage's backward fills the received activation's .grad


def _ends_rank(rank, world):
    ps = ParallelState(pp=world)
    comm = P2PCommunicator(ps.pp_group, tensor_shape=SHAPE, dtype=torch.float32, device="cpu")
    # The non-interleaved vocabulary: nothing comes before the first stage or after the last.
    x = comm.recv_forward()
    y = (x + 1) if x is not None else torch.zeros(SHAPE)
    dy = comm.send_forward_recv_backward(y)
    dx = (dy * 2) if dy is not None else torch.ones(SHAPE)
    comm.send_backward(dx)
    return x, dy


def test_a_chain_of_stages_passes_forward_and_backward() -> None:
    results = run_ranks(_ends_rank, 3, backend="gloo")
    (x0, dy0), (x1, dy1), (x2, dy2) = results
    assert x0 is None and dy2 is None
    assert torch.equal(x1, torch.zeros(SHAPE)) and torch.equal(x2, torch.ones(SHAPE))
    assert torch.equal(dy1, torch.ones(SHAPE)) and torch.equal(dy0, torch.full(SHAPE, 2.0))
