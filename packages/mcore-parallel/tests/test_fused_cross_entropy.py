"""``fused_linear_cross_entropy`` equals the output layer followed by
``vocab_parallel_cross_entropy`` (loss, hidden and weight gradients, any chunking, a per-token
upstream gradient), on one process and on two TP ranks with and without sequence parallelism,
and never holds the whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mcore.core.testing import run_ranks
from mcore.parallel import ParallelState, vocab_parallel_cross_entropy
from mcore.parallel.tensor_parallel import fused_linear_cross_entropy

S, B, H, V = 10, 3, 16, 64  # 30 tokens
CHUNKS = (1, 7, 30, 64)  # 7 does not divide 30; 64 is more than all tokens
SMOOTHING = (0.0, 0.1)


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    # Not torch.testing.assert_close inside ranks: with torch.distributed initialized it imports
    # torch.distributed.tensor (and sympy), seconds in every forked rank.
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g}"


def _problem():
    """Hidden [s, b, h], full output weight [V, h], labels [s, b] with an ignored and an
    out-of-vocabulary one, and an upstream per-token gradient (not all ones, some zeros)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, B, H, generator=gen)
    weight = 0.5 * torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (S, B), generator=gen)
    labels[0, 0] = -100
    labels[4, 2] = V + 5  # unchecked, as in vocab_parallel_cross_entropy
    grad = torch.rand(S, B, generator=gen)
    grad[1] = 0.0
    return hidden, weight, labels, grad


def _unfused(hidden, weight, labels, grad, label_smoothing=0.0):
    """The unfused single-process loss and the gradients of hidden and the full weight."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = F.linear(hidden, weight)
    loss = vocab_parallel_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    (loss * grad).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("label_smoothing", SMOOTHING)
def test_matches_the_unfused_loss_and_gradients_for_any_chunking(label_smoothing) -> None:
    hidden, weight, labels, grad = _problem()
    want = _unfused(hidden, weight, labels, grad, label_smoothing)
    for chunk in CHUNKS:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_linear_cross_entropy(
            h, w, labels, chunk_tokens=chunk, label_smoothing=label_smoothing
        )
        (loss * grad).sum().backward()
        what = f"chunk_tokens={chunk} label_smoothing={label_smoothing}"
        _assert_close(loss, want[0], f"loss, {what}")
        assert loss[0, 0] == 0
        _assert_close(h.grad, want[1], f"grad hidden, {what}")
        _assert_close(w.grad, want[2], f"grad weight, {what}")


def test_a_tied_weight_sums_both_uses_and_backward_may_run_twice() -> None:
    hidden, weight, labels, grad = _problem()
    ids = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (False, True):
        w = weight.clone().requires_grad_()
        x = hidden + F.embedding(ids, w)  # the input embedding shares the table
        if fused:
            loss = fused_linear_cross_entropy(x, w, labels, chunk_tokens=8)
        else:
            loss = vocab_parallel_cross_entropy(F.linear(x, w), labels)
        (loss * grad).sum().backward(retain_graph=fused)
        grads.append(w.grad.clone())
    _assert_close(grads[1], grads[0], "tied weight grad")
    (loss * grad).sum().backward()  # nothing saved is reused in place: a second pass works
    _assert_close(w.grad, 2 * grads[0], "tied weight grad after a second backward")


def test_low_precision_gives_an_fp32_loss_and_gradients_in_their_dtype() -> None:
    hidden, weight, labels, grad = _problem()
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    want = _unfused(hidden, weight, labels, grad)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, chunk_tokens=7)
    (loss * grad).sum().backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    _assert_close(loss, want[0], "bf16 loss", tol=1e-2)
    _assert_close(h.grad.float(), want[1].float(), "bf16 grad hidden", tol=2e-2)
    _assert_close(w.grad.float(), want[2].float(), "bf16 grad weight", tol=5e-2)


def test_shapes_and_chunk_size_are_checked() -> None:
    hidden, weight, labels, _ = _problem()
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"hidden \(10, 3, 16\) and weight \(64, 8\) disagree"):
        fused_linear_cross_entropy(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match=r"and labels \(3, 10\) disagree"):
        fused_linear_cross_entropy(hidden, weight, labels.t())


def _check_tp2(rank: int, world_size: int) -> None:
    state = ParallelState(tp=2)
    hidden, weight, labels, grad = _problem()
    want_loss, want_hidden, want_weight = _unfused(hidden, weight, labels, grad)
    shard = weight.chunk(2, dim=0)[rank].clone().requires_grad_()
    for sp in (False, True):
        for chunk in (7, 64):
            what = f"tp=2 sequence_parallel={sp} chunk_tokens={chunk}"
            h = (hidden.chunk(2, dim=0)[rank] if sp else hidden).clone().requires_grad_()
            shard.grad = None
            loss = fused_linear_cross_entropy(
                h, shard, labels, tp_group=state.tp_group, sequence_parallel=sp, chunk_tokens=chunk
            )
            (loss * grad).sum().backward()
            _assert_close(loss, want_loss, f"loss, {what}")
            # With SP each rank holds its sequence chunk of the (reduce-scattered) gradient;
            # without, the all-reduced full one.
            _assert_close(
                h.grad, want_hidden.chunk(2)[rank] if sp else want_hidden, f"grad hidden, {what}"
            )
            _assert_close(shard.grad, want_weight.chunk(2)[rank], f"grad weight, {what}")


def test_tp2_with_and_without_sequence_parallelism_matches_one_process() -> None:
    run_ranks(_check_tp2, 2, backend="gloo")


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under this mode and still alive, sampled after each
    aten op (forward and backward both dispatch here): tensors that existed before (inputs,
    weights) do not count; kernels' internal scratch space is not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # else entering the mode imports torch._dynamo (seconds) to disable it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        # An input's storage not tracked yet existed before (a view of the weight, say).
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_peak_memory_stays_well_below_one_full_logits_tensor() -> None:
    s, b, h, vocab, chunk = 32, 8, 16, 32768, 32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(s, b, h, generator=gen).requires_grad_()
    weight = (0.1 * torch.randn(vocab, h, generator=gen)).requires_grad_()
    labels = torch.randint(0, vocab, (s, b), generator=gen)
    full_logits = s * b * vocab * 4  # fp32: 32 MiB
    peaks = {}
    for fused in (False, True):
        hidden.grad = weight.grad = None
        with _PeakLiveBytes() as tracker:
            if fused:
                loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
            else:
                loss = vocab_parallel_cross_entropy(F.linear(hidden, weight), labels)
            loss.sum().backward()
        del loss
        peaks[fused] = tracker.peak
    assert peaks[False] >= full_logits  # the tracker sees the unfused logits
    # One chunk of logits (4 MiB), the weight gradient (2 MiB) and small change: 6 MiB.
    assert peaks[True] < full_logits / 4, f"fused peak {peaks[True] / 2**20:.1f} MiB"
