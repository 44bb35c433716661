"""The gated delta rule: chunked scan and decode step against a per-token loop and transformers.

The torch reference (``mcore.ssm.gated_delta``) is checked against a naive per-token loop written
here, in fp64 and fp32, forward and backward, and against the two torch functions of transformers'
Qwen3-Next. The Triton kernels are checked against the reference: under Triton's CPU interpreter
in a child pytest process started with ``TRITON_INTERPRET=1`` (Triton decides compiled or
interpreted when a kernel module is imported), and compiled on CUDA where a GPU is present.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

from mcore.core.testing import check_pytest_child, pytest_in_child
from mcore.ssm.gated_delta import gated_delta_rule, gated_delta_step

# Recorded before any test runs: in the child process nothing else imported them yet.
_API_IMPORTED_TRITON = "triton" in sys.modules
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on", "y"}
_TOLERANCES = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-5, 1e-5)}


def assert_close(
    got: torch.Tensor, want: torch.Tensor, *, rtol: float | None = None, atol: float | None = None
) -> None:
    """Same shape and dtype, and elementwise close (tolerances by dtype unless given)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    default_rtol, default_atol = _TOLERANCES.get(want.dtype, (2e-2, 2e-2))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ok = torch.isclose(got, want, rtol=rtol, atol=atol)
    if not bool(ok.all()):
        worst = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{int((~ok).sum())}/{ok.numel()} elements differ, max |diff| {worst}")


def make_inputs(
    b: int,
    s: int,
    h: int,
    dk: int,
    dv: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random q, k, v, a log decay g <= 0 (fp32 unless fp64), beta in (0, 1), a state."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dt)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(device, state_dtype)

    return {
        "q": randn(b, s, h, dk),
        "k": randn(b, s, h, dk),
        "v": randn(b, s, h, dv),
        "g": -rand(b, s, h) * 0.7,  # mild decays, so early tokens still matter at the end
        "beta": rand(b, s, h).to(dtype) * 0.9 + 0.05,
        "initial_state": randn(b, h, dk, dv, dt=state_dtype) * 0.5,
    }


def naive_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token: the definition the chunked form must reproduce."""
    b, s, h, dk = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * (dk**-0.5 if scale is None else scale)
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state
    state = state.to(dtype)
    outs = []
    for t in range(s):
        if seq_idx is not None and t > 0:
            fresh = (seq_idx[:, t] != seq_idx[:, t - 1]).to(dtype)
            state = state * (1 - fresh)[:, None, None, None]
        state = state * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta = beta[:, t, :, None] * (v[:, t] - predicted)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], delta)
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, 1), state


def packed_seq_idx(lengths: list[list[int]], ids: list[list[int]] | None = None) -> torch.Tensor:
    """``[b, s]`` ids for rows packed from sequences of the given lengths."""
    rows = []
    for r, row in enumerate(lengths):
        names = ids[r] if ids is not None else range(len(row))
        rows.append(torch.cat([torch.full((n,), i) for i, n in zip(names, row, strict=True)]))
    return torch.stack(rows)


def grads_of(fn, inputs: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of ``fn``'s outputs w.r.t. ``inputs[names]``."""
    leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in inputs.items()}
    outputs = fn(**leaves)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(out.shape, generator=gen, dtype=torch.float64) for out in outputs]
    loss = sum((out * w.to(out)).sum() for out, w in zip(outputs, weights, strict=True))
    return list(torch.autograd.grad(loss, [leaves[n] for n in names]))


# The torch reference against the naive loop.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("s", "chunk_size"), [(45, 16), (45, 64), (40, 8), (7, 1), (1, 16)])
def test_chunked_matches_the_token_loop(dtype: torch.dtype, s: int, chunk_size: int) -> None:
    x = make_inputs(2, s, 3, 8, 6, dtype=dtype)
    out, final = gated_delta_rule(**x, chunk_size=chunk_size, return_final_state=True)
    want_out, want_final = naive_gated_delta(**x)
    assert_close(out, want_out)
    assert_close(final, want_final)


def test_strong_decay_stays_finite() -> None:
    # Decays that underflow to zero inside a chunk: no inf or nan, forward or backward.
    x = make_inputs(1, 40, 2, 8, 4, seed=2)
    x["g"] = x["g"] * 60
    out, final = gated_delta_rule(**x, chunk_size=16, return_final_state=True)
    want_out, want_final = naive_gated_delta(**x)
    assert_close(out, want_out)
    assert_close(final, want_final)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    grads = grads_of(lambda **inputs: gated_delta_rule(**inputs, chunk_size=16), x, names)
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_without_initial_state_or_norm_and_with_a_scale() -> None:
    x = make_inputs(1, 37, 2, 5, 7, dtype=torch.float64)
    x["k"] = x["k"] * 0.3  # not normalised: keep |k|^2 beta < 2 so the recurrence stays tame
    del x["initial_state"]
    kwargs = {"use_qk_l2norm": False, "scale": 0.7}
    out, final = gated_delta_rule(**x, chunk_size=16, return_final_state=True, **kwargs)
    want_out, want_final = naive_gated_delta(**x, **kwargs)
    assert_close(out, want_out)
    assert_close(final, want_final)
    assert torch.equal(gated_delta_rule(**x, chunk_size=16, **kwargs), out)


def test_low_precision_inputs_compute_in_fp32() -> None:
    x = make_inputs(1, 33, 2, 16, 16)
    low = {n: t.to(torch.bfloat16) if n in ("q", "k", "v") else t for n, t in x.items()}
    out, final = gated_delta_rule(**low, chunk_size=16, return_final_state=True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    up = {n: t.float() for n, t in low.items()}
    want_out, want_final = naive_gated_delta(**up)
    assert_close(out, want_out.bfloat16())
    assert_close(final, want_final, rtol=1e-5, atol=1e-5)


def test_empty_sequence_keeps_the_state() -> None:
    x = make_inputs(2, 0, 2, 4, 3)
    out, final = gated_delta_rule(**x, return_final_state=True)
    assert out.shape == (2, 0, 2, 3)
    assert torch.equal(final, x["initial_state"])


def test_bad_shapes_raise() -> None:
    x = make_inputs(1, 5, 2, 4, 3)
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(**{**x, "g": x["g"][:, :4]})
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_delta_rule(**{**x, "initial_state": x["initial_state"].mT})
    with pytest.raises(ValueError, match="seq_idx must be"):
        gated_delta_rule(**x, seq_idx=torch.zeros(1, 4, dtype=torch.long))


# Against transformers' Qwen3-Next functions (fp32 inside, like ours).


@pytest.mark.filterwarnings("ignore")
def test_matches_transformers() -> None:
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x = make_inputs(2, 45, 3, 16, 8)
    out, final = gated_delta_rule(**x, chunk_size=16, return_final_state=True)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    options = {
        "initial_state": x["initial_state"],
        "output_final_state": True,
        "use_qk_l2norm_in_kernel": True,
    }
    for want_out, want_final in (
        qwen3_next.torch_chunk_gated_delta_rule(*args, chunk_size=16, **options),
        qwen3_next.torch_recurrent_gated_delta_rule(*args, **options),
    ):
        assert_close(out, want_out)
        assert_close(final, want_final)


# The decode step.


def test_steps_equal_the_scan() -> None:
    x = make_inputs(2, 20, 3, 8, 6)
    want_out, want_final = gated_delta_rule(**x, chunk_size=8, return_final_state=True)
    state = x["initial_state"].clone()
    outs = []
    for t in range(20):
        token = {n: x[n][:, t] for n in ("q", "k", "v", "g", "beta")}
        outs.append(gated_delta_step(state, **token))
    assert_close(torch.stack(outs, 1), want_out)
    assert_close(state, want_final)


def test_prefix_scan_then_steps_equal_one_scan() -> None:
    x = make_inputs(1, 30, 2, 8, 8, dtype=torch.bfloat16)
    want_out, want_final = gated_delta_rule(**x, chunk_size=16, return_final_state=True)
    prefix = {n: t[:, :23] if n != "initial_state" else t for n, t in x.items()}
    out, state = gated_delta_rule(**prefix, chunk_size=16, return_final_state=True)
    outs = [out]
    for t in range(23, 30):
        token = {n: x[n][:, t] for n in ("q", "k", "v", "g", "beta")}
        step_out = gated_delta_step(state, **token)
        assert step_out.dtype == torch.bfloat16 and state.dtype == torch.float32
        outs.append(step_out[:, None])
    assert_close(torch.cat(outs, 1).float(), want_out.float(), rtol=1e-2, atol=1e-2)
    assert_close(state, want_final, rtol=1e-4, atol=1e-4)


def test_step_updates_the_state_in_place() -> None:
    x = make_inputs(2, 1, 2, 4, 4, dtype=torch.float64)
    state = x["initial_state"].clone()
    token = {n: x[n][:, 0] for n in ("q", "k", "v", "g", "beta")}
    out = gated_delta_step(state, **token, use_qk_l2norm=False, scale=0.5)
    want_out, want_final = naive_gated_delta(**x, use_qk_l2norm=False, scale=0.5)
    assert_close(out, want_out[:, 0])
    assert_close(state, want_final)


# Packed rows.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_rows_equal_separate_sequences(dtype: torch.dtype) -> None:
    # Boundaries inside chunks, on chunk edges (16, 32), a one-token sequence, a long one.
    lengths = [[5, 11, 1, 20, 8], [16, 16, 13], [45]]
    seq_idx = packed_seq_idx(lengths, [[3, 4, 9, 10, 11], [0, 1, 2], [7]])
    x = make_inputs(3, 45, 2, 8, 6, dtype=dtype)
    out, final = gated_delta_rule(**x, chunk_size=16, seq_idx=seq_idx, return_final_state=True)
    for r, row in enumerate(lengths):
        begin = 0
        for i, n in enumerate(row):
            part = {
                m: t[r : r + 1, begin : begin + n] for m, t in x.items() if m != "initial_state"
            }
            init = x["initial_state"][r : r + 1] if i == 0 else None
            want_out, want_final = gated_delta_rule(
                **part, chunk_size=16, initial_state=init, return_final_state=True
            )
            assert_close(out[r : r + 1, begin : begin + n], want_out)
            begin += n
        assert_close(final[r : r + 1], want_final)  # the row's last sequence
    want_out, want_final = naive_gated_delta(**x, seq_idx=seq_idx)
    assert_close(out, want_out)
    assert_close(final, want_final)


# Gradients.


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_the_token_loop(packed: bool) -> None:
    x = make_inputs(2, 21, 2, 4, 3, dtype=torch.float64, seed=1)
    seq_idx = packed_seq_idx([[6, 15], [8, 2, 11]]) if packed else None
    names = ["q", "k", "v", "g", "beta", "initial_state"]

    def chunked(**inputs):
        return gated_delta_rule(**inputs, chunk_size=8, seq_idx=seq_idx, return_final_state=True)

    got = grads_of(chunked, x, names)
    want = grads_of(lambda **inputs: naive_gated_delta(**inputs, seq_idx=seq_idx), x, names)
    for name, got_grad, want_grad in zip(names, got, want, strict=True):
        assert torch.isfinite(got_grad).all(), name
        assert_close(got_grad, want_grad)


# The Triton kernels against the reference.


class _TritonChecks:
    """The checks, run by a subclass that names the device."""

    device: str

    @pytest.mark.parametrize(
        ("with_state", "packed", "dtype", "dv"),
        [
            (True, False, torch.float32, 8),
            (False, True, torch.float32, 8),
            (True, True, torch.bfloat16, 8),
            (True, True, torch.float32, 40),  # two blocks of dv, the second masked
        ],
    )
    def test_scan(self, with_state: bool, packed: bool, dtype: torch.dtype, dv: int) -> None:
        from mcore.ssm.kernels.gated_delta import gated_delta_rule_triton

        x = make_inputs(1, 40, 2, 8, dv, dtype=dtype, device=self.device)
        if not with_state:
            del x["initial_state"]
        seq_idx = packed_seq_idx([[10, 6, 24]]).to(self.device) if packed else None
        options = {"chunk_size": 16, "seq_idx": seq_idx, "return_final_state": True}
        out, final = gated_delta_rule_triton(**x, **options)
        want_out, want_final = gated_delta_rule(**x, **options)
        assert out.dtype == dtype and final.dtype == torch.float32
        assert_close(out, want_out)
        assert_close(final, want_final)

    def test_scan_gradients_recompute_the_reference(self) -> None:
        from mcore.ssm.kernels.gated_delta import gated_delta_rule_triton

        x = make_inputs(1, 40, 2, 8, 8, dtype=torch.float64, device=self.device)
        names = ["q", "k", "v", "g", "beta", "initial_state"]
        options = {"chunk_size": 16, "return_final_state": True}
        got = grads_of(lambda **inputs: gated_delta_rule_triton(**inputs, **options), x, names)
        want = grads_of(lambda **inputs: gated_delta_rule(**inputs, **options), x, names)
        for got_grad, want_grad in zip(got, want, strict=True):
            assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)  # fp32 forward, fp64 back

    def test_step(self) -> None:
        from mcore.ssm.kernels.gated_delta import gated_delta_step_triton

        x = make_inputs(2, 3, 2, 8, 72, device=self.device)  # two blocks of dv, one masked
        state, want_state = x["initial_state"].clone(), x["initial_state"].clone()
        for t in range(3):
            token = {n: x[n][:, t] for n in ("q", "k", "v", "g", "beta")}
            out = gated_delta_step_triton(state, **token)
            assert_close(out, gated_delta_step(want_state, **token))
            assert_close(state, want_state)
        transposed = want_state.mT.contiguous().mT  # not contiguous: updated through a copy
        token = {n: x[n][:, 0] for n in ("q", "k", "v", "g", "beta")}
        gated_delta_step_triton(transposed, **token, use_qk_l2norm=False, scale=0.2)
        gated_delta_step(want_state, **token, use_qk_l2norm=False, scale=0.2)
        assert_close(transposed, want_state)

    def test_chunk_size_must_be_a_power_of_two(self) -> None:
        from mcore.ssm.kernels.gated_delta import gated_delta_rule_triton

        x = make_inputs(1, 4, 1, 4, 4, device=self.device)
        with pytest.raises(ValueError, match="power-of-two"):
            gated_delta_rule_triton(**x, chunk_size=24)


class TestTritonUnderInterpreter(_TritonChecks):
    """On the CPU through Triton's interpreter: collected only where TRITON_INTERPRET=1."""

    __test__ = _INTERPRET
    device = "cpu"

    def test_importing_the_reference_imports_no_triton(self) -> None:
        assert not _API_IMPORTED_TRITON


@pytest.mark.gpu
class TestTritonOnCuda(_TritonChecks):
    """Compiled for the GPU."""

    device = "cuda"


@pytest.mark.skipif(_INTERPRET, reason="TRITON_INTERPRET is set: the checks run in this process")
def test_triton_under_the_interpreter(pytestconfig: pytest.Config, tmp_path) -> None:
    pytest.importorskip("triton")
    log = tmp_path / "log.txt"
    node = f"{__file__}::TestTritonUnderInterpreter"
    check_pytest_child(pytest_in_child(pytestconfig, node, log, TRITON_INTERPRET="1"), log)


@pytest.fixture
def forget_kernel_module() -> Iterator[None]:
    """Un-import the kernel module imported here compiled-mode, so that a later test in this
    process that sets TRITON_INTERPRET before importing it still gets the interpreter."""
    name = "mcore.ssm.kernels.gated_delta"
    imported_before = name in sys.modules
    yield
    if not imported_before:
        sys.modules.pop(name, None)


@pytest.mark.skipif(_INTERPRET, reason="TRITON_INTERPRET is set: CPU kernels would run")
@pytest.mark.usefixtures("forget_kernel_module")
def test_triton_on_cpu_without_the_interpreter_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    from mcore.ssm.kernels.gated_delta import gated_delta_rule_triton, gated_delta_step_triton

    x = make_inputs(1, 4, 1, 4, 4)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        gated_delta_rule_triton(**x, chunk_size=16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    token = {n: x[n][:, 0] for n in ("q", "k", "v", "g", "beta")}
    with pytest.raises(RuntimeError, match="only after .* was imported"):
        gated_delta_step_triton(x["initial_state"], **token)
