"""Serving hybrid models (Mamba-2 ``M``, gated delta net ``G``) with mcore-inference's engine.

The oracle is a greedy loop that recomputes the whole model forward over the full sequence for
every token (``model(ids)``, no cache, no recurrent state kept between calls): whatever the
engine's batching does (chunked prefill, decodes beside prefill chunks, preemption, suspend,
refit, padding to CUDA-graph shapes), its greedy tokens must be those. An audit of every
step's batch checks the recurrent-state slots: one per running request, never the scratch slot
0, constant while the request runs, and all zeros when a request computes its first token.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
import torch

pytest.importorskip("mcore.inference")

from mcore.inference import DynamicInferenceEngine, InferenceConfig, SamplingParams
from mcore.inference.context import BatchDims, StepBatch
from mcore.inference.cuda_graphs import graph_shapes
from mcore.inference.errors import InvalidRequestError
from mcore.inference.recurrent_state import (
    SCRATCH_SLOT,
    RecurrentStateConfig,
    StateSlots,
)
from mcore.inference.request import OutputCollector
from mcore.models.config import TransformerConfig
from mcore.models.gpt import GPTModel
from mcore.ssm.config import SSMConfig

VOCAB = 128
NEW = 6
"""Tokens generated per request."""


def greedy(max_tokens: int = NEW) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model is tiny: one thread is fastest, and several fight over shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_model(pattern: str = "M*G-", seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=len(pattern),
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        hybrid_override_pattern=pattern,
    )
    ssm = SSMConfig(
        mamba_head_dim=16,
        mamba_num_groups=2,
        mamba_state_dim=8,
        linear_key_head_dim=8,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        mamba_chunk_size=8,
        linear_chunk_size=8,
    )
    return GPTModel(config, sections={"ssm": ssm}).eval()


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return build_model()


Reference = Callable[[list[int], int], tuple[list[int], list[float]]]


def reference_of(model: GPTModel) -> Reference:
    """``ref(prompt, n)``: greedy tokens and their log-probabilities, each from a full forward
    over the whole sequence so far (memoised)."""
    memo: dict[tuple[tuple[int, ...], int], tuple[list[int], list[float]]] = {}

    @torch.inference_mode()
    def ref(prompt: list[int], n: int = NEW) -> tuple[list[int], list[float]]:
        key = (tuple(prompt), n)
        if key not in memo:
            ids, logprobs = list(prompt), []
            for _ in range(n):
                logits = model(torch.tensor([ids]))[0, -1].float()
                token = int(logits.argmax())
                ids.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            memo[key] = (ids[len(prompt) :], logprobs)
        return memo[key]

    return ref


@pytest.fixture(scope="module")
def reference(model) -> Reference:
    return reference_of(model)


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def make_engine(model: GPTModel, **overrides) -> DynamicInferenceEngine:
    base = dict(
        max_requests=16,
        max_tokens=16,
        block_size_tokens=4,
        kv_cache_blocks=256,
        device="cpu",
        dtype="float32",
        max_sequence_length=256,
    )
    return DynamicInferenceEngine(model, InferenceConfig(**{**base, **overrides}))


def check_matches_reference(outputs, prompts, reference: Reference, n: int = NEW) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        tokens, logprobs = reference(prompt, n)
        assert out.token_ids == tokens, f"prompt of {len(prompt)} tokens"
        torch.testing.assert_close(out.logprobs, logprobs, rtol=0, atol=1e-4)


class SlotAudit:
    """Wraps the engine context's ``build_batch`` and checks every step's state slots."""

    def __init__(self, engine: DynamicInferenceEngine) -> None:
        self.engine = engine
        self.context = engine.context
        self._build = self.context.build_batch
        self.context.build_batch = self.build
        self.steps: list[dict] = []
        self.running_slot: dict = {}
        """The slot of each request since its (last) admission."""
        self.dirty_reuses = 0
        """First chunks whose slot held another request's state before it was zeroed."""

    def _slot_state_is_zero(self, slot: int) -> bool:
        return all(not t[slot].any() for ts in self.context.states.values() for t in ts)

    def build(self, chunks, dims: BatchDims | None = None) -> StepBatch:
        slots = self.context.state_slots
        for chunk in chunks:
            if chunk.start == 0 and not self._slot_state_is_zero(
                slots.slot(chunk.request.request_id)
            ):
                self.dirty_reuses += 1
        step = self._build(chunks, dims)
        paged = step.paged
        decode = [c for c in chunks if c.num_tokens == 1]
        prefill = [c for c in chunks if c.num_tokens > 1]
        decode_slots = paged.decode_state_slots.tolist()
        prefill_slots = paged.prefill_state_slots.tolist()
        # Padding rows (CUDA-graph shapes) point at the scratch slot.
        assert all(s == SCRATCH_SLOT for s in decode_slots[len(decode) :])
        assert all(s == SCRATCH_SLOT for s in prefill_slots[len(prefill) :])
        by_request = {}
        for chunk, slot in [
            *zip(decode, decode_slots, strict=False),
            *zip(prefill, prefill_slots, strict=False),
        ]:
            rid = chunk.request.request_id
            by_request[rid] = slot
            assert slot == slots.slot(rid) and 1 <= slot < slots.num_slots
            if chunk.start == 0:  # a first chunk (after admission or readmission) reads zeros
                assert self._slot_state_is_zero(slot), f"request {rid}: slot {slot} not zeroed"
                self.running_slot[rid] = slot
            else:  # later chunks continue from the state the earlier ones left
                assert self.running_slot[rid] == slot
                assert not self._slot_state_is_zero(slot)
        assert len(set(by_request.values())) == len(by_request), "two requests share a slot"
        self.steps.append(
            {
                "decode": {c.request.request_id: by_request[c.request.request_id] for c in decode},
                "prefill": {
                    c.request.request_id: by_request[c.request.request_id] for c in prefill
                },
            }
        )
        return step


class Steps:
    """Steps an engine by hand, joining each request's deltas into its whole output."""

    def __init__(self, engine: DynamicInferenceEngine) -> None:
        self.engine = engine
        self.collectors: dict = defaultdict(OutputCollector)

    def step(self) -> None:
        for delta in self.engine.step():
            self.collectors[delta.request_id].add(delta)

    def run_to_completion(self, ids: list) -> list:
        while self.engine.has_unfinished_requests():
            self.step()
        return [self.collectors[i].output() for i in ids]


def check_all_returned(engine: DynamicInferenceEngine) -> None:
    slots = engine.context.state_slots
    assert slots.num_in_use == 0 and slots.num_free == slots.num_slots - 1
    assert engine.context.kv.usage() == 0.0


# -- generations --------------------------------------------------------------------------------


def test_sixteen_chunked_and_preempted_requests_match_full_recompute(model, reference) -> None:
    lengths = [1, 2, 3, 5, 7, 9, 12, 15, 17, 20, 24, 29, 33, 38, 41, 46]
    prompts = prompts_of(lengths)
    # 16-token steps: prompts are prefilled in chunks beside other requests' decodes; 20
    # blocks of 4 tokens hold 76 of the ~400 tokens, so requests are preempted (their slot
    # freed) and recomputed from a re-zeroed slot.
    engine = make_engine(model, kv_cache_blocks=20)
    audit = SlotAudit(engine)
    outputs = engine.generate(prompts, greedy())
    check_matches_reference(outputs, prompts, reference)
    stats = engine.stats()
    assert stats.preemptions > 0
    assert any(o.metrics.num_preemptions for o in outputs)
    assert any(len(s["prefill"]) and len(s["decode"]) for s in audit.steps)
    assert audit.dirty_reuses > 0  # slots were reused after other requests, and zeroed
    assert stats.state_slots_in_use == 0 and stats.prefix_cache_hit_tokens == 0
    check_all_returned(engine)


@pytest.mark.parametrize(
    ("lengths", "max_requests"),
    [([1, 9, 14], 1), ([1, 1, 1, 1], 4)],
    ids=["one-request-token-by-token", "four-decodes-batched"],
)
def test_decode_steps_alone_match_full_recompute(model, reference, lengths, max_requests) -> None:
    """Budget of one token per request: every token (prompt ones too) takes the decode path
    (conv state shift and one recurrent step per token), never the chunked scan."""
    prompts = prompts_of(lengths, seed=2)
    engine = make_engine(model, max_requests=max_requests, max_tokens=max_requests)
    audit = SlotAudit(engine)
    outputs = engine.generate(prompts, greedy())
    check_matches_reference(outputs, prompts, reference)
    assert all(not s["prefill"] for s in audit.steps)
    assert max(len(s["decode"]) for s in audit.steps) == max_requests
    check_all_returned(engine)


def test_a_chunked_prefill_beside_decodes_uses_its_own_slot(model, reference) -> None:
    """Megatron's bug: a request prefilled in chunks while others decode must read and write
    its own state slot, never a decode request's, and continue exactly chunk to chunk."""
    short = prompts_of([3, 4, 5], seed=3)
    (long,) = prompts_of([50], seed=4)
    engine = make_engine(model, max_requests=4, max_tokens=12)
    audit = SlotAudit(engine)
    ids = [engine.add_request(p, greedy(16)) for p in short]
    steps = Steps(engine)
    steps.step()
    steps.step()  # the short prompts are prefilled and decoding
    long_id = engine.add_request(long, greedy())
    outputs = steps.run_to_completion([*ids, long_id])
    mixed = [s for s in audit.steps if long_id in s["prefill"] and len(s["decode"]) == 3]
    assert len(mixed) >= 4  # 50 tokens in 9-token chunks beside 3 decodes
    long_slots = {s["prefill"][long_id] for s in mixed}
    assert len(long_slots) == 1
    for s in mixed:
        assert s["prefill"][long_id] not in s["decode"].values()
    check_matches_reference(outputs[:3], short, reference, n=16)
    check_matches_reference(outputs[3:], [long], reference)
    check_all_returned(engine)


def test_a_model_without_attention_runs_on_states_alone() -> None:
    ssm_only = build_model("MG-", seed=5)
    assert ssm_only.kv_cache_specs() == {}
    prompts = prompts_of([2, 11, 27], seed=6)
    engine = make_engine(ssm_only, max_requests=4, max_tokens=8)
    assert engine.context.kv_memory_bytes() == 0 and engine.context.state_memory_bytes() > 0
    outputs = engine.generate(prompts, greedy())
    check_matches_reference(outputs, prompts, reference_of(ssm_only))


# -- slots ----------------------------------------------------------------------------------


def test_slots_are_reused_zeroed_and_freed_on_finish_and_abort(model, reference) -> None:
    prompts = prompts_of([6, 13, 2, 21, 9], seed=7)
    engine = make_engine(model, max_requests=2, max_tokens=8)
    audit = SlotAudit(engine)
    outputs = engine.generate(prompts, greedy())
    check_matches_reference(outputs, prompts, reference)
    used = [
        s for step in audit.steps for s in [*step["decode"].values(), *step["prefill"].values()]
    ]
    assert set(used) == {1, 2}  # 5 requests took turns in the 2 slots
    assert audit.dirty_reuses >= 3
    assert max(len(s["decode"]) + len(s["prefill"]) for s in audit.steps) == 2
    check_all_returned(engine)

    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.context.state_slots.slot(rid) == 1 and engine.stats().state_slots_in_use == 1
    engine.abort(rid)
    check_all_returned(engine)


def test_state_slots_hand_out_the_lowest_free_slot_and_never_the_scratch_one() -> None:
    slots = StateSlots(4)
    assert [slots.assign(r) for r in "abc"] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="no free"):
        slots.assign("d")
    with pytest.raises(RuntimeError, match="already"):
        slots.assign("a")
    slots.free("b")
    assert slots.assign("d") == 2 and slots.in_use() == [1, 2, 3]
    assert slots.take_to_zero() == [1, 2, 3, 2]
    with pytest.raises(KeyError):
        slots.slot("b")


# -- suspend, resume and refit ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["offload", "recompute", "refit"])
def test_suspend_resume_and_refit_mid_generation(model, reference, mode) -> None:
    prompts = prompts_of([5, 18, 11, 30], seed=8)
    steady = make_engine(model, max_requests=4, max_tokens=12)
    expected = steady.generate(prompts, greedy(10))

    engine = make_engine(model, max_requests=4, max_tokens=12)
    ids = [engine.add_request(p, greedy(10)) for p in prompts]
    steps = Steps(engine)
    for _ in range(5):
        steps.step()
    held = {rid: engine.context.state_slots.get(rid) for rid in ids}
    if mode == "refit":
        engine.update_weights(model.state_dict())  # the same weights: nothing changes
    else:
        engine.suspend(mode)
        assert engine.context.memory_bytes() == 0 and engine.stats().recurrent_state_bytes == 0
        engine.resume()
    if mode != "recompute":  # the requests kept their slots (and states)
        assert {rid: engine.context.state_slots.get(rid) for rid in ids} == held
    outputs = steps.run_to_completion(ids)
    check_matches_reference(outputs, prompts, reference, n=10)
    if mode != "recompute":  # the same states and KV bits: the same log-probabilities
        assert [o.logprobs for o in outputs] == [o.logprobs for o in expected]
    check_all_returned(engine)


# -- configuration and memory -------------------------------------------------------------------


def test_prefix_caching_is_switched_off_with_one_log_line(model, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mcore.inference"):
        engine = make_engine(model, enable_prefix_caching=True)
    lines = [r.getMessage() for r in caplog.records if "prefix caching" in r.getMessage()]
    assert len(lines) == 1 and "recurrent state" in lines[0]
    assert engine.context.kv.enable_prefix_caching is False
    (prompt,) = prompts_of([24], seed=9)
    (first,) = engine.generate([prompt], greedy())
    (second,) = engine.generate([prompt], greedy())  # its blocks would be cached by now
    assert engine.stats().prefix_cache_hit_tokens == 0
    assert second.metrics.num_cached_prompt_tokens == 0
    assert first.token_ids == second.token_ids


def test_state_memory_is_described_and_counted(model) -> None:
    config = RecurrentStateConfig.from_model(model, max_requests=3, dtype=torch.bfloat16)
    specs = model.recurrent_state_specs()
    assert set(config.layers) == set(specs) and config.num_slots == 4
    per_request = 0
    for spec in specs.values():
        (conv, state), dtypes = spec.shapes, config.dtypes(spec)
        assert dtypes == (torch.bfloat16, torch.float32)  # the recurrent state stays fp32
        per_request += 2 * torch.Size(conv).numel() + 4 * torch.Size(state).numel()
    assert config.bytes_per_request() == per_request
    assert config.to_dict()["total_bytes"] == 4 * per_request
    tensors = config.allocate("cpu")
    assert {layer: [t.shape[0] for t in ts] for layer, ts in tensors.items()} == {
        layer: [4, 4] for layer in specs
    }

    engine = make_engine(model, max_requests=5, max_tokens=8)
    fp32 = engine.state_config
    assert fp32.num_slots == 6 and fp32.dtype == torch.float32
    stats = engine.stats()
    assert stats.recurrent_state_bytes == fp32.total_bytes() == engine.context.state_memory_bytes()
    assert engine.context.memory_bytes() == stats.kv_cache_bytes + stats.recurrent_state_bytes

    # Without kv_cache_blocks, the states come out of buffer_size_gb before the KV blocks.
    per_block = engine.context.kv_memory_bytes() // engine.context.num_blocks
    buffer = fp32.total_bytes() + 10 * per_block + per_block // 2
    sized = make_engine(model, max_requests=5, max_tokens=8, kv_cache_blocks=None,
                        buffer_size_gb=buffer / 2**30)  # fmt: skip
    assert sized.context.num_blocks == 10
    with pytest.raises(InvalidRequestError, match="recurrent states") as info:
        make_engine(model, max_requests=5, max_tokens=8, kv_cache_blocks=None,
                    buffer_size_gb=fp32.total_bytes() / 2**30)  # fmt: skip
    assert info.value.field == "buffer_size_gb"


# -- CUDA-graph shapes --------------------------------------------------------------------------


def test_steps_padded_to_graph_shapes_give_the_same_tokens(model, reference) -> None:
    """What a CUDA graph replays, run eagerly on the CPU: each step padded to a captured shape,
    its padding rows on the scratch slot 0, which must not disturb the requests' states."""
    prompts = prompts_of([4, 30, 11, 23, 7], seed=10)
    engine = make_engine(model, max_requests=8, max_tokens=40)
    audit = SlotAudit(engine)
    # No decode-only shapes past 2 decodes: 3 or 4 decodes pad to a shape with a prefill row.
    shapes = [s for s in graph_shapes(8, 40, None, [16, 32]) if s.num_prefill or s.num_decode <= 2]
    runner, used = engine.runner, []

    def execute_padded(chunks):
        decode = sum(1 for c in chunks if c.num_tokens == 1)
        actual = BatchDims(sum(c.num_tokens for c in chunks), len(chunks) - decode, decode)
        fitting = [s for s in shapes if s.fits(actual)]
        if not fitting:
            return type(runner).execute(runner, chunks)
        dims = min(fitting)
        used.append((dims, actual))
        batch = engine.context.build_batch(chunks, dims)
        with torch.inference_mode():
            logits = runner.model.forward_paged(batch.paged)
        return logits.index_select(0, batch.sample_rows), batch.sample_chunks

    runner.execute = execute_padded
    ids, steps = [], Steps(engine)
    for prompt in prompts:  # one by one: steps mix a prefill chunk with running decodes
        ids.append(engine.add_request(prompt, greedy()))
        steps.step()
    outputs = steps.run_to_completion(ids)
    assert any(d.num_prefill and a.num_decode for d, a in used)
    assert any(d.num_decode > a.num_decode for d, a in used)  # padded decode rows
    assert any(d.num_prefill > a.num_prefill for d, a in used)  # a padded prefill row
    assert audit.steps
    check_matches_reference(outputs, prompts, reference)


@pytest.mark.gpu
def test_cuda_graphs_replay_hybrid_steps_like_eager_ones() -> None:
    cuda_model = build_model()
    prompts = prompts_of([4, 30, 11, 50, 7], seed=11)
    graphs = make_engine(
        cuda_model, device="cuda", max_requests=8, max_tokens=64, enable_cuda_graph=True,
        cuda_graph_prefill_tokens=[32, 64],
    )  # fmt: skip
    assert graphs.runner.graphs.disabled_reason is None
    ids, steps = [], Steps(graphs)
    for prompt in prompts:
        ids.append(graphs.add_request(prompt, greedy()))
        steps.step()
    outputs = steps.run_to_completion(ids)
    assert graphs.runner.graph_steps > 0
    eager = make_engine(build_model(), device="cuda", max_requests=8, max_tokens=64)
    expected = eager.generate(prompts, greedy())
    for want, got in zip(expected, outputs, strict=True):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-3)
    graphs.suspend("offload")
    graphs.resume()  # states restored, graphs recaptured over the new tensors
    again = graphs.generate(prompts[:2], greedy())
    assert [o.token_ids for o in again] == [o.token_ids for o in expected[:2]]
