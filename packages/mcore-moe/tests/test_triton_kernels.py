"""The Triton paths (``fused=True``) against the torch paths, forward and backward.

Triton decides at import of a kernel module whether its kernels run compiled or in the CPU
interpreter, from ``TRITON_INTERPRET``. So the CPU checks run in a child pytest process started
with ``TRITON_INTERPRET=1`` (``test_kernels_under_the_interpreter``), whatever this process has
imported already; there ``TestKernelsUnderInterpreter`` is collected, here it is not. On a
machine with CUDA, ``TestKernelsOnCuda`` runs the same checks compiled, in this process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

from mcore.core.testing import check_pytest_child, pytest_in_child
from mcore.moe.activations import weighted_squared_relu
from mcore.moe.permute import permute, sort_chunks_by_index, unpermute

# Recorded before any test runs: in the child nothing else imported the kernels yet.
_API_IMPORTED_TRITON = "triton" in sys.modules or "mcore.moe.kernels.permute" in sys.modules
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on", "y"}


# torch.testing's defaults. torch.testing, like autograd.grad with explicit grad_outputs,
# imports sympy on first use, which takes seconds on a small machine: the tests use neither.
_TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5)}


def assert_close(
    got: torch.Tensor, want: torch.Tensor, *, rtol: float | None = None, atol: float | None = None
) -> None:
    """``got`` matches ``want`` in shape, dtype and values (elementwise, within tolerances)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    default_rtol, default_atol = _TOLERANCES.get(want.dtype, (1.6e-2, 1e-5))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ok = torch.isclose(got, want, rtol=rtol, atol=atol)
    if not bool(ok.all()):
        worst = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{int((~ok).sum())}/{ok.numel()} elements differ, max |diff| {worst}")


def routing(
    num_tokens: int, num_experts: int, topk: int, device: str, *, empty_expert: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k routing: bool map and fp32 probs (zero where not routed)."""
    logits = torch.randn(num_tokens, num_experts)
    if empty_expert is not None:
        logits[:, empty_expert] = -torch.inf
    top = logits.topk(topk, dim=1)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map.scatter_(1, top.indices, True)
    probs = torch.zeros(num_tokens, num_experts).scatter(1, top.indices, top.values.softmax(1))
    return routing_map.to(device), probs.to(device)


def run_both(fn, inputs: list[torch.Tensor | None], **kwargs) -> tuple[list, list]:
    """``fn(*inputs, fused=...)`` both ways: outputs and the gradients of a random loss."""
    results = []
    for fused in (False, True):
        leaves = [
            x.detach().clone().requires_grad_(x.is_floating_point()) if x is not None else None
            for x in inputs
        ]
        outputs = fn(*leaves, fused=fused, **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        floats = [out for out in outputs if out is not None and out.is_floating_point()]
        gen = torch.Generator().manual_seed(7)
        loss = sum(
            (out.double() * torch.randn(out.shape, generator=gen).to(out.device).double()).sum()
            for out in floats
        )
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        results.append((outputs, torch.autograd.grad(loss, wrt)))
    (ref_out, ref_grads), (out, grads) = results
    return list(zip(ref_out, out, strict=True)), list(zip(ref_grads, grads, strict=True))


def assert_same(pairs: list, *, exact: bool = False) -> None:
    """Each ``(want, got)`` pair equal, exactly or to the precision of its dtype."""
    for want, got in pairs:
        if want is None:
            assert got is None
        elif exact:
            assert torch.equal(got, want)
        else:
            assert got.dtype == want.dtype and got.shape == want.shape
            # The kernels round once from fp32, the torch paths may round to bf16 at every op,
            # so results can be a couple of bf16 ulps (~0.8% each) apart.
            tol = {"rtol": 2e-2, "atol": 1e-2} if got.dtype == torch.bfloat16 else {}
            assert_close(got, want, **tol)


class _KernelChecks:
    """The checks, run by a subclass that names the device."""

    device: str

    @pytest.mark.parametrize(
        ("topk", "hidden", "dtype", "with_probs"),
        [
            (2, 40, torch.float32, True),
            (1, 40, torch.float32, False),
            (3, 1030, torch.float32, True),  # more than one hidden block, with a masked tail
            (2, 40, torch.bfloat16, True),
        ],
    )
    def test_permute(self, topk: int, hidden: int, dtype: torch.dtype, with_probs: bool) -> None:
        routing_map, probs = routing(7, 4, topk, self.device, empty_expert=1 if topk < 3 else None)
        tokens = torch.randn(7, hidden, device=self.device).to(dtype)

        def fn(tokens, probs, fused):
            return permute(tokens, routing_map, probs, fused=fused)

        outputs, grads = run_both(fn, [tokens, probs if with_probs else None])
        assert_same(outputs, exact=True)  # copies and an index: bit for bit
        assert_same(grads)

    @pytest.mark.parametrize("num_out_tokens", [14, 9, 17])
    def test_permute_with_explicit_num_out_tokens(self, num_out_tokens: int) -> None:
        routing_map, probs = routing(7, 4, 2, self.device)  # 14 routed pairs

        def fn(tokens, probs, fused):
            return permute(tokens, routing_map, probs, num_out_tokens=num_out_tokens, fused=fused)

        outputs, grads = run_both(fn, [torch.randn(7, 24, device=self.device), probs])
        assert_same(outputs, exact=True)
        assert_same(grads)

    def test_padding_route_with_zero_probability(self) -> None:
        routing_map, probs = routing(6, 4, 1, self.device)
        routing_map[0, int((~routing_map[0]).nonzero()[0])] = True  # probability stays 0
        tokens = torch.randn(6, 24, device=self.device)

        def fn(tokens, probs, fused):
            permuted, permuted_probs, indices = permute(tokens, routing_map, probs, fused=fused)
            return unpermute(permuted * 3, indices, 6, probs=permuted_probs, fused=fused)

        outputs, grads = run_both(fn, [tokens, probs])
        assert_same(outputs)
        assert_same(grads)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("with_probs", [True, False])
    def test_unpermute(self, dtype: torch.dtype, with_probs: bool) -> None:
        routing_map, probs = routing(9, 5, 3, self.device)
        zeros = torch.zeros(9, 1, device=self.device)
        _, permuted_probs, indices = permute(zeros, routing_map, probs)
        rows = torch.randn(len(indices), 36, device=self.device).to(dtype)

        def fn(rows, permuted_probs, fused):
            return unpermute(rows, indices, 9, probs=permuted_probs, fused=fused)

        outputs, grads = run_both(fn, [rows, permuted_probs if with_probs else None])
        assert outputs[0][1].dtype == dtype
        assert_same(outputs)
        assert_same(grads)

    @pytest.mark.parametrize("sizes_as_tensor", [False, True])
    def test_sort_chunks_by_index(self, sizes_as_tensor: bool) -> None:
        sizes, order = [2, 0, 3, 1, 4], [3, 0, 4, 2, 1]
        split_sizes = torch.tensor(sizes, device=self.device) if sizes_as_tensor else sizes

        def fn(x, probs, fused):
            return sort_chunks_by_index(x, split_sizes, order, probs=probs, fused=fused)

        x, probs = torch.randn(10, 2, 20, device=self.device), torch.rand(10, device=self.device)
        outputs, grads = run_both(fn, [x, probs])
        assert_same(outputs, exact=True)
        assert_same(grads, exact=True)

    @pytest.mark.parametrize(
        ("shape", "dtype"), [((6, 40), torch.float32), ((2, 3, 1030), torch.bfloat16)]
    )
    def test_weighted_squared_relu(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        x = torch.randn(shape, device=self.device).to(dtype)
        weights = torch.rand(shape[:-1], device=self.device)
        grad_out = torch.randn(shape, device=self.device).to(dtype)
        # The reference runs in fp32 on the same values, as the kernel does: the torch path in
        # bf16 rounds at every op, and its bf16 sum for the weights' gradient is far off.
        ref_x, ref_w = x.float().requires_grad_(), weights.clone().requires_grad_()
        want = weighted_squared_relu(ref_x, ref_w)
        want_grads = torch.autograd.grad((want * grad_out.float()).sum(), [ref_x, ref_w])
        got_x, got_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
        got = weighted_squared_relu(got_x, got_w, fused=True)
        got_grads = torch.autograd.grad((got * grad_out).sum(), [got_x, got_w])

        assert got.dtype == dtype and got_grads[0].dtype == dtype
        assert_same([(want.to(dtype), got), (want_grads[0].to(dtype), got_grads[0])])
        # fp32 sums over a row, in another order.
        assert_close(got_grads[1], want_grads[1], rtol=1e-5, atol=1e-4)


class TestKernelsUnderInterpreter(_KernelChecks):
    """On the CPU through Triton's interpreter: collected only where TRITON_INTERPRET=1."""

    __test__ = _INTERPRET
    device = "cpu"

    def test_importing_the_api_imports_no_triton(self) -> None:
        assert not _API_IMPORTED_TRITON


@pytest.mark.gpu
class TestKernelsOnCuda(_KernelChecks):
    """Compiled for the GPU."""

    device = "cuda"


@pytest.mark.skipif(_INTERPRET, reason="TRITON_INTERPRET is set: the checks run in this process")
def test_kernels_under_the_interpreter(pytestconfig: pytest.Config, tmp_path) -> None:
    pytest.importorskip("triton")
    log = tmp_path / "log.txt"
    node = f"{__file__}::TestKernelsUnderInterpreter"
    check_pytest_child(pytest_in_child(pytestconfig, node, log, TRITON_INTERPRET="1"), log)


@pytest.fixture
def forget_kernel_modules() -> Iterator[None]:
    """Un-import the kernel modules this test imports, compiled-mode, so that a later test in
    this process that sets TRITON_INTERPRET before its first fused call still gets it."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("mcore.moe.kernels."):
            del sys.modules[name]


@pytest.mark.skipif(_INTERPRET, reason="TRITON_INTERPRET is set: CPU kernels would run")
@pytest.mark.usefixtures("forget_kernel_modules")
def test_fused_on_cpu_without_the_interpreter_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    routing_map, probs = routing(4, 3, 1, "cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        permute(torch.randn(4, 8), routing_map, probs, fused=True)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        weighted_squared_relu(torch.randn(4, 8), torch.rand(4), fused=True)
    # The kernels are imported by now, so setting the variable no longer helps; the error says so.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="only after .* was imported"):
        unpermute(torch.randn(4, 8), torch.arange(4), 4, fused=True)


def test_the_reference_activation_has_the_analytic_gradients() -> None:
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(5, 12, dtype=torch.float64)
    out = weighted_squared_relu(x, weights)
    grad_x, grad_w = torch.autograd.grad((out * grad_out).sum(), [x, weights])
    relu = x.detach().clamp(min=0)
    assert_close(out, relu**2 * weights[:, None])
    assert_close(grad_x, 2 * relu * weights.detach()[:, None] * grad_out)
    assert_close(grad_w, (relu**2 * grad_out).sum(1))
