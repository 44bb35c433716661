"""The flex dispatcher: its backends refuse clearly where they cannot run, and on GPUs its
dispatch+combine equals a plain computation of the experts' weighted sum."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import types

import pytest
import torch

from mcore.core import Lazy, PluginManager, UnknownComponentError, hookimpl
from mcore.core.testing import run_ranks
from mcore.models import ModelContext, TransformerConfig
from mcore.moe.config import MoEConfig
from mcore.moe.dispatcher.flex import (
    FlexBackend,
    FlexBackendUnavailable,
    expand_for_etp,
    expert_comm_group,
    topk_from_dense,
)
from mcore.parallel import ParallelState

HIDDEN = 32


class ReferenceBackend(FlexBackend):
    """A one-process backend written the obvious way, to check the dispatcher around it."""

    name = "reference"
    needs_nccl = False

    def dispatch(self, hidden, topk_indices, topk_probs):
        rows, probs, owners = [], [], []
        for expert in range(self.num_local_experts):
            token, slot = (topk_indices == expert).nonzero(as_tuple=True)
            rows.append(hidden[token])
            probs.append(topk_probs[token, slot])
            owners.append(token)
        self._owners, self._num_tokens = torch.cat(owners), hidden.shape[0]
        counts = torch.tensor([len(o) for o in owners], dtype=torch.int64)
        return torch.cat(rows), counts, torch.cat(probs)

    def combine(self, expert_output):
        out = expert_output.new_zeros(self._num_tokens, expert_output.shape[1])
        return out.index_add(0, self._owners, expert_output)


class FlexPlugin:
    """What mcore-moe's plugin registers for the flex dispatcher, plus the reference backend."""

    @hookimpl
    def mcore_register(self, registry):
        registry.add("token_dispatcher", "flex", Lazy("mcore.moe.dispatcher.flex:FlexDispatcher"))
        registry.add("flex_backend", "deepep", Lazy("mcore.moe.dispatcher.deepep:DeepEPBackend"))
        registry.add(
            "flex_backend", "hybridep", Lazy("mcore.moe.dispatcher.hybridep:HybridEPBackend")
        )
        registry.add("flex_backend", "reference", ReferenceBackend)


def make_context(state: ParallelState | None = None) -> ModelContext:
    """A model context whose registries hold only the flex dispatcher and its backends."""
    manager = PluginManager()
    manager.register(FlexPlugin(), name="flex-test")
    return ModelContext(
        TransformerConfig(hidden_size=HIDDEN),
        state or ParallelState(),
        registries=manager.registries,
    )


def build_flex(ctx: ModelContext, backend: str | None, num_experts: int = 4, **moe_fields):
    """Build the flex dispatcher as an MoE layer would, for this rank's share of the experts."""
    moe = MoEConfig(
        num_experts=num_experts,
        router_topk=2,
        token_dispatcher_type="flex",
        flex_dispatcher_backend=backend,
        **moe_fields,
    )
    ep, ep_rank = ctx.parallel_state.ep_size, ctx.parallel_state.ep_rank
    local = num_experts // ep
    indices = list(range(ep_rank * local, (ep_rank + 1) * local))
    return ctx.build(
        "token_dispatcher", "flex", ctx, moe, num_local_experts=local, local_expert_indices=indices
    )


def random_routing(tokens: int, num_experts: int, topk: int, device: str = "cpu"):
    """Top-k choices as a router makes them: probabilities (a leaf, to check its gradient) and
    expert indices."""
    scores = torch.randn(tokens, num_experts, device=device).softmax(dim=-1)
    top, indices = scores.topk(topk, dim=-1)
    return top.detach().requires_grad_(), indices


def dense_routing(top: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """The dense ``probs`` and ``routing_map`` ``[T, E]`` that dispatchers take."""
    shape = (top.shape[0], num_experts)
    dense = torch.zeros(shape, device=top.device).scatter(1, indices, top)
    routing_map = torch.zeros(shape, dtype=torch.bool, device=top.device).scatter(1, indices, True)
    return dense, routing_map


def expert_scales(global_ids: list[int], tokens_per_expert: torch.Tensor, device) -> torch.Tensor:
    """Toy experts: expert ``e`` multiplies its rows by ``e + 1``."""
    scale = torch.tensor([e + 1.0 for e in global_ids], device=device)
    return scale.repeat_interleave(tokens_per_expert.to(device))


def dense_oracle(hidden: torch.Tensor, dense_probs: torch.Tensor) -> torch.Tensor:
    """What any dispatcher must compute with the toy experts: sum_e p[t, e] * (e + 1) * x[t]."""
    scale = torch.arange(1, dense_probs.shape[1] + 1, dtype=torch.float32, device=hidden.device)
    return (dense_probs.float() @ scale).unsqueeze(1) * hidden.float()


# --- where a backend cannot run -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_backend_that_cannot_run_here_says_what_is_missing_and_the_fix(backend) -> None:
    # A single-process state has no NCCL group, so this refuses everywhere; what it names
    # depends on what this machine lacks.
    with pytest.raises(RuntimeError) as info:
        build_flex(make_context(), backend)
    message = str(info.value)
    assert isinstance(info.value, FlexBackendUnavailable)
    assert f"moe.flex_dispatcher_backend = {backend!r} cannot run" in message
    if not torch.cuda.is_available():
        assert "needs CUDA; this process has no GPU" in message
        assert "use moe.token_dispatcher_type = 'alltoall'" in message
    if importlib.util.find_spec("deep_ep") is None:
        assert "deep_ep is not installed: pip install deep-ep" in message
        assert "on a machine with NVIDIA GPUs" in message
    if torch.cuda.is_available() and importlib.util.find_spec("deep_ep") is not None:
        assert "needs torch.distributed with NCCL" in message


def test_unknown_backend_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownComponentError, match="unknown flex backend 'nccl_ep'") as info:
        build_flex(make_context(), "nccl_ep")
    assert "deepep" in str(info.value) and "hybridep" in str(info.value)


def test_flex_without_a_backend_names_the_field() -> None:
    with pytest.raises(FlexBackendUnavailable, match=r"moe.flex_dispatcher_backend is unset"):
        build_flex(make_context(), None)


def test_padding_to_capacity_is_refused() -> None:
    with pytest.raises(FlexBackendUnavailable, match="moe.pad_expert_input_to_capacity"):
        build_flex(
            make_context(), "deepep", expert_capacity_factor=1.0, pad_expert_input_to_capacity=True
        )


# --- the dispatcher's own logic, around a reference backend -----------------------------------


def test_topk_form_keeps_zero_probability_routes_and_pads_with_minus_one() -> None:
    routing_map = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    probs = torch.tensor([[0.75, 0.0, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0]])
    indices, topk_probs = topk_from_dense(probs, routing_map, k=3)
    rows = [
        sorted(zip(i.tolist(), p.tolist(), strict=True))
        for i, p in zip(indices, topk_probs, strict=True)
    ]
    assert rows == [[(0, 0.75), (2, 0.25), (3, 0.0)], [(-1, 0.0), (-1, 0.0), (2, 1.0)]]
    assert indices.dtype == torch.int64 and topk_probs.dtype == torch.float32


def test_etp_expansion_sends_each_token_to_every_etp_rank_of_its_expert() -> None:
    # 2 EP ranks x 2 ETP ranks, 2 local experts: expert 3 lives on EP rank 1 (group ranks 2, 3)
    # as local expert 1, i.e. experts 5 and 7 of the group's numbering.
    indices = torch.tensor([[3, -1], [0, 2]])
    probs = torch.tensor([[0.75, 0.0], [0.5, 0.5]])
    expanded, expanded_probs = expand_for_etp(indices, probs, etp=2, num_local_experts=2)
    assert expanded.tolist() == [[5, 7, -1, -1], [0, 2, 4, 6]]
    assert expanded_probs.tolist() == [[0.75, 0.75, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]


@pytest.mark.parametrize("probs_applied", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_dispatch_and_combine_compute_the_weighted_sum_of_experts(
    probs_applied, padded
) -> None:
    torch.manual_seed(0)
    num_experts, tokens = 4, 10
    top, indices = random_routing(tokens, num_experts, topk=2)
    dense, routing_map = dense_routing(top, indices, num_experts)
    if padded:
        # Quantisation padding routes extra tokens at probability zero: 3 routes in a row.
        routing_map[0, (routing_map[0] == 0).nonzero()[0]] = True
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    fields = {"router_padding_for_quantization": padded}
    dispatcher = build_flex(make_context(), "reference", num_experts, **fields)

    out = dispatcher.dispatch(hidden, dense, routing_map)
    assert out.tokens_per_expert.tolist() == routing_map.sum(dim=0).tolist()
    scales = expert_scales(list(range(num_experts)), out.tokens_per_expert, "cpu")
    rows = out.tokens * scales[:, None]
    if probs_applied:
        rows = rows * out.probs[:, None]
    result = dispatcher.combine(rows, probs_applied=probs_applied)

    hidden_ref = hidden.detach().clone().requires_grad_()
    top_ref = top.detach().clone().requires_grad_()
    dense_ref, _ = dense_routing(top_ref, indices, num_experts)
    expected = dense_oracle(hidden_ref, dense_ref)
    torch.testing.assert_close(result, expected)

    weights = torch.randn_like(expected)
    (result * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad)
    torch.testing.assert_close(top.grad, top_ref.grad)


def test_expert_group_spans_the_ep_and_etp_ranks_in_rank_order() -> None:
    def group_ranks(rank: int, world_size: int) -> tuple[list[int], list[int]]:
        import torch.distributed as dist

        wide = ParallelState(ep=2, etp=2, device_type="cpu")
        narrow = ParallelState(ep=2, etp=1, device_type="cpu")
        return (
            dist.get_process_group_ranks(expert_comm_group(wide)),
            dist.get_process_group_ranks(expert_comm_group(narrow)),
        )

    results = run_ranks(group_ranks, 4, backend="gloo")
    assert [wide for wide, _ in results] == [[0, 1, 2, 3]] * 4
    assert [narrow for _, narrow in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]


# --- the backends' glue, against DeepEP's one-rank contract (faked, on the CPU) -------------


def fake_deep_ep(*, elastic: bool = True) -> types.ModuleType:
    """What DeepEP promises for a one-rank group, on any device: dispatch hands every token
    back with its top-k (indices already local), combine sums a token's single row, a cached
    dispatch (handle given) repeats the layout. DeepEP 1.x's ``Buffer`` has no one-rank kernels;
    ``HybridEPBuffer`` is present so the hybridep backend gets as far as its own checks."""

    class Handle:
        def __init__(self, counts: list[int], num_experts: int) -> None:
            self.num_recv_tokens_per_expert_list = counts
            self.num_experts, self.num_sms = num_experts, 4

    class ElasticBuffer:
        def __init__(self, group, *, num_max_tokens_per_rank, hidden, num_topk, **_) -> None:
            assert group.size() == 1 and hidden == HIDDEN and num_topk == 2
            self.bound = num_max_tokens_per_rank

        def dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None,
                     num_max_tokens_per_rank=None, handle=None, **_):  # fmt: skip
            if handle is not None:
                assert num_experts == handle.num_experts
                return x.clone(), None, None, handle, None
            assert x.dtype == torch.bfloat16 and topk_weights.dtype == torch.float32
            assert num_max_tokens_per_rank == self.bound >= x.shape[0]
            counts = [int((topk_idx == e).sum()) for e in range(num_experts)]
            handle = Handle(counts, num_experts)
            return x.clone(), topk_idx.clone(), topk_weights.clone(), handle, None

        def combine(self, x, handle, topk_weights=None, **_):
            weights = None if topk_weights is None else topk_weights.clone()
            return x.clone(), weights, None

    class Buffer:
        @staticmethod
        def get_dispatch_config(num_ranks: int):
            assert num_ranks in (2, 4, 8), f"Unsupported number of EP ranks: {num_ranks}"

    module = types.ModuleType("deep_ep")
    module.__spec__ = importlib.machinery.ModuleSpec("deep_ep", None)
    module.topk_idx_t = torch.int64
    module.Buffer = Buffer
    module.ElasticBuffer = ElasticBuffer if elastic else None
    module.HybridEPBuffer = object
    return module


def one_thread() -> None:
    """Forked ranks stay on one CPU thread: an OpenMP pool the parent process already used
    hangs in a forked child (run_ranks gives a lone rank every core)."""
    torch.set_num_threads(1)


def _pretend_gpu_and_nccl(elastic: bool) -> None:
    """In a test rank: the fake library installed, the GPU and NCCL checks waived."""
    import sys

    one_thread()
    from mcore.moe.dispatcher import deepep, flex, hybridep

    sys.modules["deep_ep"] = fake_deep_ep(elastic=elastic)
    flex.nccl_problems = lambda group: []
    for backend in (deepep.DeepEPBackend, hybridep.HybridEPBackend):
        backend.unmet_requirements = classmethod(lambda cls: [])


def one_rank_deepep_equals_permute_and_unpermute(device: str) -> None:
    """Through the flex dispatcher and DeepEP on one rank, the toy experts' result and its
    gradients equal the plain path: permute, the same experts, unpermute with probabilities."""
    from mcore.moe.permute import permute, tokens_per_expert, unpermute

    torch.manual_seed(0)
    num_experts, tokens = 4, 64
    state = ParallelState(device_type=device)
    dispatcher = build_flex(make_context(state), "deepep", num_experts)
    top, indices = random_routing(tokens, num_experts, topk=2, device=device)
    dense, routing_map = dense_routing(top, indices, num_experts)
    hidden = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16, requires_grad=True)
    experts = list(range(num_experts))

    out = dispatcher.dispatch(hidden, dense, routing_map)
    rows = out.tokens * expert_scales(experts, out.tokens_per_expert, device)[:, None]
    result = dispatcher.combine(rows.to(torch.bfloat16))

    hidden_ref = hidden.detach().clone().requires_grad_()
    top_ref = top.detach().clone().requires_grad_()
    dense_ref, _ = dense_routing(top_ref, indices, num_experts)
    permuted, permuted_probs, sorted_indices = permute(hidden_ref, routing_map, dense_ref)
    counts = tokens_per_expert(routing_map).cpu()
    rows_ref = (permuted * expert_scales(experts, counts, device)[:, None]).to(torch.bfloat16)
    expected = unpermute(rows_ref, sorted_indices, tokens, probs=permuted_probs)

    assert out.tokens_per_expert.tolist() == counts.tolist()
    torch.testing.assert_close(result, expected, atol=2e-2, rtol=2e-2)
    weights = torch.randn(tokens, HIDDEN, device=device)
    (result.float() * weights).sum().backward()
    (expected.float() * weights).sum().backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(top.grad, top_ref.grad, atol=5e-2, rtol=5e-2)


def _deepep_glue_on_one_rank(rank: int, world_size: int) -> None:
    _pretend_gpu_and_nccl(elastic=True)
    one_rank_deepep_equals_permute_and_unpermute("cpu")


def test_deepep_backend_glue_matches_permute_and_unpermute_on_one_rank() -> None:
    run_ranks(_deepep_glue_on_one_rank, 1, backend="gloo")


def _one_rank_refusals(rank: int, world_size: int) -> list[str]:
    _pretend_gpu_and_nccl(elastic=False)
    messages = []
    for backend in ("deepep", "hybridep"):
        try:
            build_flex(make_context(ParallelState(device_type="cpu")), backend)
        except FlexBackendUnavailable as exc:
            messages.append(str(exc))
    return messages


def test_backends_without_one_rank_kernels_refuse_a_one_rank_group() -> None:
    (messages,) = run_ranks(_one_rank_refusals, 1, backend="gloo")
    deepep, hybridep = messages
    assert "deep_ep.Buffer (DeepEP 1.x) has no kernels for an expert group of 1" in deepep
    assert "install DeepEP 2.x (ElasticBuffer, any size)" in deepep
    assert "HybridEP needs at least 2 ranks in the expert group, got 1" in hybridep


# --- on GPUs, through DeepEP / HybridEP -------------------------------------------------------


def _has(attribute: str) -> bool:
    if importlib.util.find_spec("deep_ep") is None:
        return False
    import deep_ep

    return getattr(deep_ep, attribute, None) is not None


def _single_gpu_deepep(rank: int, world_size: int) -> None:
    one_thread()
    one_rank_deepep_equals_permute_and_unpermute("cuda")


@pytest.mark.gpu
def test_deepep_on_one_gpu_equals_permute_and_unpermute() -> None:
    if not _has("ElasticBuffer"):
        pytest.skip(
            "needs deep_ep with ElasticBuffer (DeepEP 2.x): DeepEP 1.x Buffer needs >= 2 ranks"
        )
    run_ranks(_single_gpu_deepep, 1, backend="nccl", timeout_s=300)


def _two_gpus(rank: int, world_size: int, flex_backend: str) -> None:
    one_thread()
    torch.manual_seed(rank)
    num_experts, tokens = 8, 128
    state = ParallelState(ep=world_size)
    dispatcher = build_flex(make_context(state), flex_backend, num_experts)
    top, indices = random_routing(tokens, num_experts, topk=2, device="cuda")
    dense, routing_map = dense_routing(top, indices, num_experts)
    hidden = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    out = dispatcher.dispatch(hidden, dense, routing_map)
    local = dispatcher.local_expert_indices
    rows = out.tokens * expert_scales(local, out.tokens_per_expert, "cuda")[:, None]
    result = dispatcher.combine(rows.to(torch.bfloat16))

    hidden_ref = hidden.detach().float().requires_grad_()
    top_ref = top.detach().clone().requires_grad_()
    dense_ref, _ = dense_routing(top_ref, indices, num_experts)
    expected = dense_oracle(hidden_ref, dense_ref)
    torch.testing.assert_close(result.float(), expected, atol=5e-2, rtol=2e-2)
    weights = torch.randn(tokens, HIDDEN, device="cuda")
    (result.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(hidden.grad.float(), hidden_ref.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(top.grad, top_ref.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("backend", "needs"), [("deepep", "ElasticBuffer|Buffer"), ("hybridep", "HybridEPBuffer")]
)
def test_flex_backends_on_two_gpus_equal_the_dense_weighted_sum(backend, needs) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    if not any(_has(name) for name in needs.split("|")):
        pytest.skip(f"needs deep_ep with {needs.replace('|', ' or ')}")
    run_ranks(_two_gpus, 2, backend, backend="nccl", timeout_s=300)
