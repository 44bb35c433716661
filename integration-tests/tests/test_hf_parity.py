"""mcore GPT models against Hugging Face ``transformers`` as the numerical oracle.

Each case builds a small HF model from a config with random weights (no downloads), saves it,
loads it with ``mcore.models.hf.load_hf`` and compares logits, per-token losses and gradients,
on one process and under tensor, sequence and context parallelism on real gloo ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mcore.core.testing import run_ranks  # noqa: E402
from mcore.models.hf import hf_state_dict, load_hf, save_hf  # noqa: E402
from mcore.parallel import (  # noqa: E402
    ParallelState,
    gather_from_context_parallel,
    split_for_context_parallel,
)

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,  # GQA whose key/value heads still split over TP = 4
    max_position_embeddings=64,
)
CASES = {
    "llama_gqa_llama3_rope": (
        "LlamaConfig",
        dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}),
    ),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "qwen2_qkv_bias": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3_qk_norm_yarn": (
        "Qwen3Config",
        dict(head_dim=16, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                           "factor": 4.0, "original_max_position_embeddings": 16}),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
}  # fmt: skip
B, S = 2, 16


def make_hf(case: str, folder: Path):
    config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(folder)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (B, S), generator=g)
    labels = torch.randint(0, SMALL["vocab_size"], (B, S), generator=g)
    return ids, labels


def hf_reference(model, ids, labels):
    """Logits, per-token loss and parameter gradients of the oracle."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(B, S)
    loss.sum().div(loss.numel()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    ids, labels = batch()
    return request.param, folder, (ids, labels), hf_reference(hf, ids, labels)


def compare_grads(ours: dict, theirs: dict) -> None:
    # HF ties lm_head to embed_tokens and reports the gradient once, under embed_tokens.
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-5, msg=name)


ALL_CASES = pytest.mark.parametrize("case", list(CASES), indirect=True)


@ALL_CASES
def test_single_process_matches_transformers(case) -> None:
    _, folder, (ids, labels), (logits, loss, grads) = case
    model = load_hf(folder)
    ours = model(ids)
    assert (ours - logits).abs().max().item() < 1e-4
    our_loss = model(ids, labels=labels)
    torch.testing.assert_close(our_loss, loss, rtol=1e-5, atol=1e-5)
    our_loss.sum().div(our_loss.numel()).backward()
    compare_grads(hf_state_dict(model, grads=True), grads)


@ALL_CASES
def test_save_hf_round_trips_through_transformers(case, tmp_path) -> None:
    _name, folder, (ids, _), (logits, _, _) = case
    model = load_hf(folder)
    save_hf(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert (reloaded(input_ids=ids).logits - logits).abs().max().item() < 1e-4
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == original["architectures"]


def _parallel_run(rank, world, folder, ids, labels, tp, cp, sp):
    ps = ParallelState(tp=tp, cp=cp)
    model = load_hf(folder, ps, sequence_parallel=sp)
    local_ids = split_for_context_parallel(ids, dim=1, cp_group=ps.cp_group)
    local_labels = split_for_context_parallel(labels, dim=1, cp_group=ps.cp_group)
    with torch.no_grad():
        logits = gather_from_context_parallel(model(local_ids), dim=1, cp_group=ps.cp_group)
    loss = model(local_ids, labels=local_labels)
    loss.sum().div(ids.numel()).backward()
    model.reduce_partial_grads()
    if ps.cp_size > 1:  # each CP rank holds the gradient of its own tokens
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, group=ps.cp_group)
    full_loss = gather_from_context_parallel(loss.detach(), dim=1, cp_group=ps.cp_group)
    grads = hf_state_dict(model, grads=True)
    return (logits, full_loss, grads) if rank == 0 else None


LAYOUTS = {
    "tp2": dict(world=2, tp=2, cp=1, sp=False),
    "tp2_sp": dict(world=2, tp=2, cp=1, sp=True),
    "tp4_sp": dict(world=4, tp=4, cp=1, sp=True),
    "cp2": dict(world=2, tp=1, cp=2, sp=False),
    "tp2_cp2_sp": dict(world=4, tp=2, cp=2, sp=True),
}


# Every layout on a GQA Llama and a qk-norm Qwen3; TP+SP and CP on every architecture.
PAIRS = [
    (case, layout)
    for case in CASES
    for layout in LAYOUTS
    if layout in ("tp2_sp", "cp2") or case in ("llama_gqa_llama3_rope", "qwen3_qk_norm_yarn")
]


@pytest.mark.parametrize(("case", "layout"), PAIRS, indirect=["case"])
def test_parallel_layouts_match_transformers(case, layout) -> None:
    _name, folder, (ids, labels), (logits, loss, grads) = case
    lay = LAYOUTS[layout]
    result = run_ranks(
        _parallel_run, lay["world"], folder, ids, labels, lay["tp"], lay["cp"], lay["sp"],
        backend="gloo",
    )[0]  # fmt: skip
    our_logits, our_loss, our_grads = result
    assert (our_logits - logits).abs().max().item() < 1e-4
    torch.testing.assert_close(our_loss, loss, rtol=1e-5, atol=1e-5)
    compare_grads(our_grads, grads)


def _pp_logits(rank, world, folder, ids):
    """Forward through two stages, each loading only its own weights from the HF files."""
    stage = load_hf(folder, ParallelState(pp=world))
    if rank == 0:
        torch.distributed.send(stage(ids).contiguous(), 1)
        return None
    hidden = torch.empty(ids.shape[1], ids.shape[0], SMALL["hidden_size"])
    torch.distributed.recv(hidden, 0)
    stage.set_input_tensor(hidden)
    with torch.no_grad():
        return stage(ids), stage.output_layer.weight.detach().clone()


@pytest.mark.parametrize("case", ["llama_tied", "qwen2_qkv_bias"], indirect=True)
def test_pipeline_stages_load_their_own_weights(case) -> None:
    name, folder, (ids, _), (logits, _, _) = case
    our_logits, output_weight = run_ranks(_pp_logits, 2, folder, ids, backend="gloo")[1]
    assert (our_logits - logits).abs().max().item() < 1e-4
    if name == "llama_tied":  # the last stage's copy of the tied table came from embed_tokens
        embedding = load_hf(folder).embedding.weight.detach()
        torch.testing.assert_close(output_weight, embedding, rtol=0, atol=0)
