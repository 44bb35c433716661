"""Pipeline schedules on real gloo ranks give the losses and gradients of one process.

The model is a chain of ``tanh(linear(x))`` layers on sequence-first activations ``[s, b, h]``
with a mean-squared-error loss: small enough to run in milliseconds, and every layer's gradient
depends on every stage, so a micro-batch, chunk or gradient sent to the wrong place shows.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcore.core.testing import run_ranks
from mcore.parallel import (
    ParallelLayoutError,
    ParallelState,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
    stage_layers,
)

S, B, H, LAYERS = 4, 2, 8, 8


def make_layer(index: int) -> nn.Linear:
    torch.manual_seed(index)  # each layer's weights depend on its global index alone
    return nn.Linear(H, H)


class Chain(nn.Module):
    """A stage's chunk of the chain: its layers, under their global indices."""

    def __init__(self, layer_ids, *, first: bool) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=H)
        self.layers = nn.ModuleDict({str(i): make_layer(i) for i in layer_ids})
        self.first = first
        self.input_tensor = None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else self.input_tensor
        for layer in self.layers.values():
            h = torch.tanh(layer(h))
        return h


class SyncRecorder(nn.Module):
    """A data-parallel-like wrapper: the model is ``.module``, ``no_sync()`` holds back the
    gradient reduction; records, for each gradient accumulated, whether sync was on."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.sync = True
        self.seen: list[bool] = []
        for p in module.parameters():
            p.register_post_accumulate_grad_hook(lambda p: self.seen.append(self.sync))

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def forward(self, x):
        return self.module(x)


def microbatches(num: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)) for _ in range(num)
    ]


def forward_step(data_iterator, model):
    x, target = next(data_iterator)
    out = model(x)

    def loss_func(output):
        loss = F.mse_loss(output, target)
        return loss, {"loss": loss.detach()}

    return out, loss_func


def reference(num_microbatches: int):
    """Per-micro-batch losses and layer gradients of the whole chain on one process."""
    chain = Chain(range(LAYERS), first=True)
    losses = []
    for x, target in microbatches(num_microbatches):
        loss = F.mse_loss(chain(x), target)
        (loss / num_microbatches).backward()
        losses.append(loss.detach())
    return losses, {n: p.grad for n, p in chain.named_parameters()}


def _schedule_rank(rank, world, vp, num_microbatches, forward_only, wrap):
    ps = ParallelState(pp=world)
    chunks = [
        Chain(
            stage_layers(LAYERS, pp_size=world, pp_rank=ps.pp_rank, vp_size=vp, vp_stage=c),
            first=ps.is_first_pp_stage and c == 0,
        )
        for c in range(vp)
    ]
    model = [SyncRecorder(c) for c in chunks] if wrap else chunks
    schedule = get_forward_backward_func(ps, vp_size=vp)
    expected = (
        forward_backward_pipelining_with_interleaving
        if vp > 1
        else forward_backward_pipelining_without_interleaving
    )
    assert schedule.func is expected
    data = microbatches(num_microbatches)
    metrics = schedule(
        forward_step_func=forward_step,
        data_iterator=[iter(data) for _ in model],
        model=model,
        num_microbatches=num_microbatches,
        seq_length=S,
        micro_batch_size=B,
        forward_only=forward_only,
    )
    grads = {n: p.grad for c in chunks for n, p in c.named_parameters()}
    seen = [m.seen for m in model] if wrap else None
    return [m["loss"] for m in metrics], grads, seen


CASES = {
    # name: (stages, virtual chunks, micro-batches)
    "1f1b_pp2": (2, 1, 4),
    "1f1b_pp4": (4, 1, 4),
    "1f1b_pp4_fewer_microbatches_than_stages": (4, 1, 2),
    "interleaved_pp2_vp2": (2, 2, 4),
    "interleaved_pp2_vp2_all_warmup": (2, 2, 2),
    "interleaved_pp4_vp2": (4, 2, 8),
    "interleaved_pp2_vp4": (2, 4, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_one_process(case) -> None:
    stages, vp, m = CASES[case]
    losses, grads = reference(m)
    results = run_ranks(_schedule_rank, stages, vp, m, False, False, backend="gloo")
    for stage, (stage_losses, stage_grads, _) in enumerate(results):
        if stage == stages - 1:
            torch.testing.assert_close(stage_losses, losses)
        else:
            assert stage_losses == []
        for name, grad in stage_grads.items():
            torch.testing.assert_close(grad, grads[name], msg=f"{case}: {name}")
    held = {n for _, stage_grads, _ in results for n in stage_grads}
    assert held == set(grads)  # every layer lives on exactly one stage


def test_forward_only_returns_losses_and_leaves_no_gradients() -> None:
    losses, _ = reference(4)
    results = run_ranks(_schedule_rank, 2, 2, 4, True, False, backend="gloo")
    torch.testing.assert_close(results[-1][0], losses)
    assert all(g is None for _, grads, _ in results for g in grads.values())


def test_wrapped_chunks_reduce_gradients_only_on_the_last_microbatch() -> None:
    _, grads = reference(4)
    results = run_ranks(_schedule_rank, 2, 2, 4, False, True, backend="gloo")
    for _, stage_grads, seen in results:
        for name, grad in stage_grads.items():
            torch.testing.assert_close(grad, grads[name])
        for chunk_seen in seen:  # two layers of two parameters per chunk, four micro-batches
            assert sorted(chunk_seen) == [False] * 12 + [True] * 4
            assert all(chunk_seen[-4:])


def test_one_stage_accumulates_like_a_plain_loop() -> None:
    losses, grads = reference(4)
    model = SyncRecorder(Chain(range(LAYERS), first=True))
    metrics = get_forward_backward_func(ParallelState())(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches(4)),
        model=[model],
        num_microbatches=4,
        seq_length=S,
        micro_batch_size=B,
    )
    torch.testing.assert_close([m["loss"] for m in metrics], losses)
    for name, p in model.module.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])
    per_param = 2 * LAYERS
    assert model.seen == [False] * (3 * per_param) + [True] * per_param


def _bad_microbatches_rank(rank, world):
    ps = ParallelState(pp=world)
    chunks = [Chain([2 * c + rank], first=rank == 0 and c == 0) for c in range(2)]
    with pytest.raises(ParallelLayoutError, match=r"num_microbatches \(3\) divisible"):
        forward_backward_pipelining_with_interleaving(
            forward_step_func=forward_step,
            data_iterator=[iter(microbatches(3)) for _ in chunks],
            model=chunks,
            num_microbatches=3,
            seq_length=S,
            micro_batch_size=B,
            parallel_state=ps,
        )


def test_interleaving_needs_microbatches_in_groups_of_stages() -> None:
    run_ranks(_bad_microbatches_rank, 2, backend="gloo")
