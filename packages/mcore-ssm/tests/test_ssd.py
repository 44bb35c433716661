"""The SSD scan (``mcore.ssm.ssd``) against a token-by-token loop, transformers' torch path, itself
(packing, decoding) and autograd; and the Triton kernels (``mcore.ssm.kernels.ssd``) against it.

Triton decides at import of a kernel module whether its kernels run compiled or in the CPU
interpreter, from ``TRITON_INTERPRET``. So the CPU checks of the kernels run in a child pytest
process started with ``TRITON_INTERPRET=1`` (by the ``interpreter_child`` fixture, early, so that
it overlaps the other tests; ``test_kernels_under_the_interpreter`` reports it); there
``TestKernelsUnderInterpreter`` is collected, here it is not. With CUDA, ``TestKernelsOnCuda``
runs the same checks compiled, in this process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mcore.core.testing import check_pytest_child, pytest_in_child
from mcore.ssm.ssd import ssd_scan, ssd_step

# Recorded before any test runs: in the child nothing else imported Triton yet.
_API_IMPORTED_TRITON = "triton" in sys.modules
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on", "y"}

_TOLERANCES = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-5, 1e-5)}


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol=None, atol=None) -> None:
    """Same shape and dtype, values within tolerances (avoids torch.testing: it imports sympy)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    default_rtol, default_atol = _TOLERANCES.get(want.dtype, (2e-2, 2e-2))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ok = torch.isclose(got, want, rtol=rtol, atol=atol)
    if not bool(ok.all()):
        worst = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{int((~ok).sum())}/{ok.numel()} elements differ, max |diff| {worst}")


def make_inputs(
    b: int = 2,
    s: int = 37,
    h: int = 4,
    p: int = 3,
    g: int = 2,
    n: int = 5,
    *,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs of a realistic range: dt in (0.01, 0.5], A in [-2, -0.1]."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    tensors = {
        "x": randn(b, s, h, p),
        "dt": 0.01 + 0.49 * torch.rand(b, s, h, generator=gen, dtype=torch.float64),
        "A": -(0.1 + 1.9 * torch.rand(h, generator=gen, dtype=torch.float64)),
        "B": randn(b, s, g, n),
        "C": randn(b, s, g, n),
        "D": randn(h),
        "initial_state": randn(b, h, p, n),
    }
    out = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    # dt, A and the state stay in fp32 (or fp64) whatever x is, as the module layer passes them.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for key in ("dt", "A", "initial_state"):
        out[key] = out[key].to(wide)
    return out


def sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token, straight from its definition: ``(y, final state)``."""
    b, s, h, p = x.shape
    g, n = B.shape[-2:]
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    state = x.new_zeros(b, h, p, n, dtype=f) if initial_state is None else initial_state.to(f)
    ys = []
    for t in range(s):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(f)
            state = state * same[:, None, None, None]
        B_t = B[:, t].to(f).repeat_interleave(h // g, dim=1)  # [b, h, n]
        C_t = C[:, t].to(f).repeat_interleave(h // g, dim=1)
        dt_t, x_t = dt[:, t].to(f), x[:, t].to(f)
        decay = torch.exp(dt_t * A.to(f))
        state = (
            decay[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None]
        )
        y_t = (state * C_t[:, :, None]).sum(-1)
        if D is not None:
            y_t = y_t + D.to(f)[:, None] * x_t
        ys.append(y_t)
    return torch.stack(ys, dim=1).to(x.dtype), state


def scan(inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_scan`` on a ``make_inputs`` dict, with the final state."""
    return ssd_scan(**inputs, return_final_state=True, **kwargs)


def tokens(inputs: dict[str, torch.Tensor], span: slice) -> dict[str, torch.Tensor]:
    """``inputs`` for the tokens in ``span`` (the per-token tensors sliced, the rest kept)."""
    return {k: v[:, span] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------
# The torch reference.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])  # 37 tokens: a padded tail, one chunk > s
def test_scan_matches_the_sequential_recurrence(dtype: torch.dtype, chunk_size: int) -> None:
    inputs = make_inputs(dtype=dtype)
    y, final = scan(inputs, chunk_size=chunk_size)
    want_y, want_final = sequential(**inputs)
    assert y.dtype == dtype and final.dtype == dtype
    assert_close(y, want_y)
    assert_close(final, want_final)


def test_optional_inputs_default_to_none() -> None:
    inputs = make_inputs(s=20, g=1)
    del inputs["D"], inputs["initial_state"]
    y = ssd_scan(**inputs, chunk_size=8)
    assert isinstance(y, torch.Tensor)
    assert_close(y, sequential(**inputs)[0])


def test_bf16_inputs_compute_in_fp32() -> None:
    inputs = make_inputs(dtype=torch.bfloat16)
    y, final = scan(inputs, chunk_size=16)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    # The reference on the same (bf16-rounded) values, in fp32: only y's final rounding differs.
    want_y, want_final = sequential(**{k: v.float() for k, v in inputs.items()})
    assert_close(y.float(), want_y, rtol=1e-2, atol=1e-2)
    assert_close(final, want_final)


def test_empty_sequence() -> None:
    inputs = make_inputs(s=0)
    y, final = scan(inputs)
    assert y.shape == inputs["x"].shape
    assert_close(final, inputs["initial_state"])


def test_nothing_quadratic_in_the_sequence_is_kept() -> None:
    # The largest tensor autograd saves is O(s * chunk), far below s * s.
    b, s, h, p, g, n, chunk = 1, 512, 2, 4, 1, 4, 16
    inputs = {
        k: v.requires_grad_() for k, v in make_inputs(b, s, h, p, g, n, dtype=torch.float32).items()
    }
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = scan(inputs, chunk_size=chunk)
    assert max(sizes) <= b * h * s * max(chunk, p * n) < s * s
    y.sum().backward()


def test_transformers_chunk_scan_agrees() -> None:
    nemotron_h = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    inputs = make_inputs(b=2, s=45, h=4, p=8, g=2, n=16, dtype=torch.float32)
    y, final = scan(inputs, chunk_size=16)
    want_y, want_final = nemotron_h.mamba2_chunk_scan(
        inputs["x"],
        inputs["dt"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        16,
        D=inputs["D"],
        initial_states=inputs["initial_state"],
        return_final_states=True,
    )
    assert_close(y, want_y.to(y.dtype))
    assert_close(final, want_final.float())

    # One decoding step from that state. transformers takes mamba_ssm's per-channel layout:
    # dt [b, h, p], A [h, p, n], D [h, p], which a head broadcasts.
    step = make_inputs(b=2, s=1, h=4, p=8, g=2, n=16, dtype=torch.float32, seed=1)
    x, dt, A, D = step["x"][:, 0], step["dt"][:, 0], step["A"], step["D"]
    B, C = step["B"][:, 0], step["C"][:, 0]
    state, want_state = final.clone(), final.clone()
    y = ssd_step(state, x, dt, A, B, C, D)
    want_y = nemotron_h.mamba2_selective_state_update(
        want_state,
        x,
        dt[..., None].expand(-1, -1, 8),
        A[:, None, None].expand(-1, 8, 16),
        B,
        C,
        D[:, None].expand(-1, 8),
    )
    assert_close(y, want_y)
    assert_close(state, want_state)


# A row packing three sequences: a boundary inside a chunk, one at a chunk's start (16), a
# sequence wholly inside one chunk, and padding after the last.
PACKED = [0] * 11 + [1] * 5 + [4] * 3 + [7] * 18
SEQ_IDX = torch.tensor([PACKED, [2] * 37])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_seq_idx_matches_the_recurrence_with_resets(dtype: torch.dtype) -> None:
    inputs = make_inputs(dtype=dtype)
    y, final = scan(inputs, chunk_size=8, seq_idx=SEQ_IDX)
    want_y, want_final = sequential(**inputs, seq_idx=SEQ_IDX)
    assert_close(y, want_y)
    assert_close(final, want_final)


def test_packed_row_equals_the_sequences_run_separately() -> None:
    first, second = 11, 26
    inputs = make_inputs(b=1, s=first + second)
    seq_idx = torch.tensor([[0] * first + [1] * second])
    y, final = scan(inputs, chunk_size=8, seq_idx=seq_idx)

    y_first, _ = scan(tokens(inputs, slice(0, first)), chunk_size=8)
    tail = tokens(inputs, slice(first, None))
    del tail["initial_state"]  # the initial state belongs to the row's first sequence only
    y_second, final_second = scan(tail, chunk_size=8)
    assert_close(y, torch.cat([y_first, y_second], dim=1))
    assert_close(final, final_second)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_the_scan(dtype: torch.dtype) -> None:
    inputs = make_inputs(s=12, dtype=dtype)
    y, final = scan(inputs, chunk_size=4)
    state = inputs["initial_state"].clone()
    A, D = inputs["A"], inputs["D"]
    for t in range(12):
        x_t, dt_t, B_t, C_t = (inputs[k][:, t] for k in ("x", "dt", "B", "C"))
        y_t = ssd_step(state, x_t, dt_t, A, B_t, C_t, D)
        assert y_t.dtype == dtype
        assert_close(y_t, y[:, t])
    assert_close(state, final)


def test_prefill_then_decode_equals_one_scan() -> None:
    inputs = make_inputs(s=30, dtype=torch.float32)
    y, final = scan(inputs, chunk_size=8)
    y_prefill, state = scan(tokens(inputs, slice(0, 23)), chunk_size=8)
    assert_close(y_prefill, y[:, :23])
    A, D = inputs["A"], inputs["D"]
    for t in range(23, 30):
        x_t, dt_t, B_t, C_t = (inputs[k][:, t] for k in ("x", "dt", "B", "C"))
        assert_close(ssd_step(state, x_t, dt_t, A, B_t, C_t, D), y[:, t])
    assert_close(state, final)


@pytest.mark.parametrize("seq_idx", [None, SEQ_IDX], ids=["one-sequence", "packed"])
def test_gradients_match_the_sequential_recurrence(seq_idx: torch.Tensor | None) -> None:
    inputs = make_inputs()
    grads = []
    for chunked in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        if chunked:
            y, final = scan(leaves, chunk_size=8, seq_idx=seq_idx)
        else:
            y, final = sequential(**leaves, seq_idx=seq_idx)
        gen = torch.Generator().manual_seed(3)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
        loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, got, want in zip(inputs, *grads, strict=True):
        assert got.abs().sum() > 0, name
        assert_close(got, want)


def test_shape_errors() -> None:
    inputs = make_inputs(s=8)
    with pytest.raises(ValueError, match="dt has shape"):
        ssd_scan(**{**inputs, "dt": inputs["dt"][:, :4]})
    with pytest.raises(ValueError, match="cannot be split into 3 groups"):
        three_groups = torch.zeros(2, 8, 3, 5, dtype=torch.float64)
        ssd_scan(**{**inputs, "B": three_groups, "C": three_groups})
    with pytest.raises(ValueError, match="seq_idx has shape"):
        ssd_scan(**inputs, seq_idx=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="state has shape"):
        ssd_step(inputs["initial_state"][:1], *(inputs[k][:, 0] for k in ("x", "dt")),
                 inputs["A"], inputs["B"][:, 0], inputs["C"][:, 0])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The Triton kernels.


class _KernelChecks:
    """The kernels against the torch reference, run by a subclass that names the device."""

    device: str

    @pytest.mark.parametrize(
        ("h", "g", "seq_idx"),
        [(2, 1, None), (4, 2, [[0] * 9 + [1] * 20 + [2] * 11])],
        ids=["one-group", "groups-packed"],
    )
    def test_scan_forward_and_backward(self, h: int, g: int, seq_idx: list | None) -> None:
        from mcore.ssm.kernels.ssd import ssd_scan_triton

        inputs = make_inputs(b=1, s=40, h=h, p=4, g=g, n=8, dtype=torch.float32, device=self.device)
        seq = torch.tensor(seq_idx, device=self.device) if seq_idx is not None else None
        results = []
        for fn in (ssd_scan, ssd_scan_triton):
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            y, final = fn(**leaves, chunk_size=16, seq_idx=seq, return_final_state=True)
            gen = torch.Generator().manual_seed(5)
            loss = (y * torch.randn(y.shape, generator=gen).to(y.device)).sum() + (
                final * torch.randn(final.shape, generator=gen).to(y.device)
            ).sum()
            results.append((y, final, *torch.autograd.grad(loss, list(leaves.values()))))
        for want, got in zip(*results, strict=True):
            assert_close(got, want, rtol=1e-4, atol=1e-4)

    def test_scan_bf16_and_defaults(self) -> None:
        from mcore.ssm.kernels.ssd import ssd_scan_triton

        inputs = make_inputs(b=2, s=21, h=2, p=4, g=1, n=8, dtype=torch.bfloat16)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        del inputs["D"], inputs["initial_state"]
        y = ssd_scan_triton(**inputs, chunk_size=16)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
        assert_close(y.float(), ssd_scan(**inputs, chunk_size=16).float(), rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("with_d", [True, False])
    def test_step(self, with_d: bool) -> None:
        from mcore.ssm.kernels.ssd import ssd_step_triton

        inputs = make_inputs(b=2, s=1, h=4, p=4, g=2, n=8, dtype=torch.float32, device=self.device)
        args = [inputs[k][:, 0] for k in ("x", "dt")] + [inputs["A"]]
        args += [inputs[k][:, 0] for k in ("B", "C")]
        d = inputs["D"] if with_d else None
        want_state, state = inputs["initial_state"].clone(), inputs["initial_state"].clone()
        want = ssd_step(want_state, *args, d)
        got = ssd_step_triton(state, *args, d)
        assert_close(got, want)
        assert_close(state, want_state)


class TestKernelsUnderInterpreter(_KernelChecks):
    """On the CPU through Triton's interpreter: collected only where TRITON_INTERPRET=1."""

    __test__ = _INTERPRET
    device = "cpu"

    def test_importing_the_torch_path_imports_no_triton(self) -> None:
        assert not _API_IMPORTED_TRITON


@pytest.mark.gpu
class TestKernelsOnCuda(_KernelChecks):
    """Compiled for the GPU."""

    device = "cuda"


_CHILD_TEST = "test_kernels_under_the_interpreter"


@pytest.fixture(scope="module", autouse=True)
def interpreter_child(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, Path] | None]:
    """The child pytest run of ``TestKernelsUnderInterpreter``, started with this module's first
    test so that it overlaps the others (it is mostly interpreter start-up and imports);
    ``test_kernels_under_the_interpreter`` waits for it. None where that test will not run."""
    selected = any(
        item.path == Path(__file__) and item.name == _CHILD_TEST for item in request.session.items
    )
    if _INTERPRET or not selected or importlib.util.find_spec("triton") is None:
        yield None
        return
    log = tmp_path_factory.mktemp("interpreter") / "log.txt"
    node = f"{__file__}::TestKernelsUnderInterpreter"
    child = pytest_in_child(request.config, node, log, TRITON_INTERPRET="1")
    try:
        yield child, log
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.skipif(_INTERPRET, reason="TRITON_INTERPRET is set: the checks run in this process")
def test_kernels_under_the_interpreter(
    interpreter_child: tuple[subprocess.Popen, Path] | None,
) -> None:
    pytest.importorskip("triton")
    assert interpreter_child is not None
    check_pytest_child(*interpreter_child)


@pytest.fixture
def forget_kernel_modules() -> Iterator[None]:
    """Un-import the kernel modules this test imports compiled-mode, so that a later test in
    this process that sets TRITON_INTERPRET before its first kernel call still gets it."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("mcore.ssm.kernels."):
            del sys.modules[name]


@pytest.mark.skipif(_INTERPRET, reason="TRITON_INTERPRET is set: CPU kernels would run")
@pytest.mark.usefixtures("forget_kernel_modules")
def test_kernels_on_cpu_without_the_interpreter_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    from mcore.ssm import kernels

    inputs = make_inputs(b=1, s=4, h=2, p=2, g=1, n=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        kernels.load("ssd", "ssd_scan", inputs["x"])
    module = sys.modules["mcore.ssm.kernels.ssd"]
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        module.ssd_scan_triton(**inputs)
    # The kernels are imported by now, so setting the variable no longer helps; the error says so.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="only after .* was imported"):
        module.ssd_step_triton(
            inputs["initial_state"], inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"],
            inputs["B"][:, 0], inputs["C"][:, 0],
        )  # fmt: skip
