"""Nemotron-H and Qwen3-Next against Hugging Face ``transformers`` as the numerical oracle.

Each case builds a tiny HF model from a config (random weights, every norm, bias and per-head
vector perturbed so that a misplaced row shows), saves it and loads it with ``load_hf``:
logits, per-token losses and gradients match transformers on one process and under TP 2 with
sequence parallelism (gloo ranks); pipeline stages (PP 2) give the single-process model's
logits, losses and gradients; ``save_hf`` writes what transformers loads back unchanged, under
TP too; config.json round-trips; what mcore cannot express is refused by name.

The models are :mod:`mcore.ssm.testing`'s (Nemotron-H with ``M E * -`` layers, Qwen3-Next with
``G E * E G -``).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("mcore.moe")

from mcore.core.testing import run_ranks  # noqa: E402
from mcore.models.hf import hf_state_dict, load_hf, read_hf_config, save_hf  # noqa: E402
from mcore.parallel import ParallelState  # noqa: E402
from mcore.ssm.hf import NEMOTRON_H, QWEN3_NEXT  # noqa: E402
from mcore.ssm.testing import CASES, make_hf  # noqa: E402

VOCAB, B, S = 64, 2, 12


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (B, S), generator=g), torch.randint(
        0, VOCAB, (B, S), generator=g
    )


def file_grads(model) -> dict[str, torch.Tensor]:
    """The HF model's gradients under the names its files use (transformers renames and splits
    fused experts on save: let it do so on a copy whose weights are the gradients)."""
    from safetensors.torch import load_file

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, twin_p in zip(model.parameters(), twin.parameters(), strict=True):
            twin_p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        twin.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def hf_reference(model, ids, labels):
    """Logits, per-token loss and file-named gradients of the oracle."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(B, S)
    loss.mean().backward()
    return logits.detach(), loss.detach(), file_grads(model)


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    ids, labels = batch()
    return request.param, folder, (ids, labels), hf_reference(hf, ids, labels)


def compare_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours, "no gradients to compare"
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def reload_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


ALL_CASES = pytest.mark.parametrize("case", list(CASES), indirect=True)


@ALL_CASES
def test_single_process_matches_transformers(case) -> None:
    _, folder, (ids, labels), (logits, loss, grads) = case
    model = load_hf(folder)
    with torch.no_grad():
        assert max_diff(model(ids), logits) < 1e-4
    our_loss = model(ids, labels=labels)
    torch.testing.assert_close(our_loss, loss, rtol=1e-5, atol=1e-5)
    our_loss.mean().backward()
    ours = hf_state_dict(model, grads=True)
    assert set(ours) <= set(grads)
    compare_grads(ours, grads)


@ALL_CASES
def test_save_hf_round_trips_through_transformers(case, tmp_path) -> None:
    _, folder, (ids, _), (logits, _, _) = case
    save_hf(load_hf(folder), tmp_path)
    assert max_diff(reload_logits(tmp_path, ids), logits) < 1e-4
    # config.json -> mcore -> config.json -> mcore: the same model and sections.
    arch, config, sections = read_hf_config(folder)
    again = read_hf_config(tmp_path)
    assert again.architecture is arch
    assert again.config == config
    assert again.sections == sections


def _tp_run(rank, world, folder, ids, labels, out):
    ps = ParallelState(tp=world)
    model = load_hf(folder, ps, sequence_parallel=True)  # MoE layers under TP need SP
    with torch.no_grad():
        logits = model(ids)
    loss = model(ids, labels=labels)
    loss.mean().backward()
    model.reduce_partial_grads()
    grads = hf_state_dict(model, grads=True)
    save_hf(model, out)  # gathers the TP shards, Mamba's blocks each on its own
    return (logits, loss.detach(), grads) if rank == 0 else None


@ALL_CASES
def test_tensor_parallel_matches_transformers(case, tmp_path) -> None:
    _, folder, (ids, labels), (logits, loss, grads) = case
    our_logits, our_loss, our_grads = run_ranks(
        _tp_run, 2, folder, ids, labels, tmp_path, backend="gloo"
    )[0]
    assert max_diff(our_logits, logits) < 1e-4
    torch.testing.assert_close(our_loss, loss, rtol=1e-5, atol=1e-5)
    compare_grads(our_grads, grads)
    assert max_diff(reload_logits(tmp_path, ids), logits) < 1e-4


def _pp_run(rank, world, folder, ids, labels):
    """Two pipeline stages, each loading only its own weights from the HF files; activations
    and their gradients pass between them point to point."""
    stage = load_hf(folder, ParallelState(pp=world))
    shape = (S, B, stage.config.hidden_size)
    if rank == 0:
        hidden = stage(ids)
        dist.send(hidden.detach().contiguous(), 1)
        grad = torch.empty(shape)
        dist.recv(grad, 1)
        hidden.backward(grad)
        out = None
    else:
        hidden = torch.empty(shape)
        dist.recv(hidden, 0)
        hidden.requires_grad_(True)
        stage.set_input_tensor(hidden)
        with torch.no_grad():
            logits = stage(ids)
        stage.set_input_tensor(hidden)
        loss = stage(ids, labels=labels)
        loss.mean().backward()
        dist.send(hidden.grad.contiguous(), 0)
        out = logits, loss.detach()
    grads = {n: p.grad for n, p in stage.named_parameters()}
    return out, grads


@ALL_CASES
def test_pipeline_stages_match_one_process(case) -> None:
    _, folder, (ids, labels), _ = case
    whole = load_hf(folder)
    with torch.no_grad():
        logits = whole(ids)
    loss = whole(ids, labels=labels)
    loss.mean().backward()
    (_, first), ((our_logits, our_loss), last) = run_ranks(
        _pp_run, 2, folder, ids, labels, backend="gloo"
    )
    assert max_diff(our_logits, logits) < 1e-5
    torch.testing.assert_close(our_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    expected = dict(whole.named_parameters())
    assert set(first) | set(last) == set(expected) and not set(first) & set(last)
    for name, grad in {**first, **last}.items():
        torch.testing.assert_close(grad, expected[name].grad, rtol=1e-5, atol=1e-6, msg=name)


# --- config translation -------------------------------------------------------------------------


def test_layer_patterns_follow_the_hf_layer_types() -> None:
    nemotron = NEMOTRON_H.to_config(CASES["nemotron_h"][1])
    assert nemotron.hybrid_override_pattern == "ME*-"
    assert nemotron.position_embedding_type == "none" and nemotron.activation == "squared_relu"
    # Files written before transformers 5 name things differently.
    legacy = NEMOTRON_H.to_config({"hybrid_override_pattern": "M-M*", "attention_head_dim": 16})
    assert legacy.hybrid_override_pattern == "M-M*" and legacy.head_dim == 16
    renamed = {"layers_block_type": ["mamba", "attention"], "mamba_n_groups": 2}
    assert NEMOTRON_H.to_config(renamed).hybrid_override_pattern == "M*"
    assert NEMOTRON_H.sections_from_hf(renamed)["ssm"].mamba_num_groups == 2
    qwen = QWEN3_NEXT.to_config(CASES["qwen3_next"][1])
    assert qwen.hybrid_override_pattern == "GE*EG-" and qwen.rotary_percent == 0.5
    assert qwen.layernorm_zero_centered_gamma and qwen.attention_output_gate
    # Without layer_types: every 4th layer is full attention; decoder_sparse_step picks MoE.
    implicit = QWEN3_NEXT.to_config({"num_hidden_layers": 4, "decoder_sparse_step": 2})
    assert implicit.hybrid_override_pattern == "G-GEG-*E"


def test_what_mcore_cannot_express_is_refused_by_name() -> None:
    nemotron = CASES["nemotron_h"][1]
    for bad, field in (
        ({"moe_latent_size": 8}, "moe_latent_size"),
        ({"mamba_proj_bias": False}, "mamba_proj_bias"),
        ({"mamba_hidden_act": "gelu"}, "mamba_hidden_act"),
    ):
        with pytest.raises(NotImplementedError, match=field):
            NEMOTRON_H.sections_from_hf({**nemotron, **bad})
    for bad, field in (
        ({"sliding_window": 64}, "sliding_window"),
        ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
    ):
        with pytest.raises(NotImplementedError, match=field):
            NEMOTRON_H.to_config({**nemotron, **bad})
    qwen = CASES["qwen3_next"][1]
    with pytest.raises(NotImplementedError, match="attention_bias"):
        QWEN3_NEXT.to_config({**qwen, "attention_bias": True})
    with pytest.raises(NotImplementedError, match="hidden_act"):
        QWEN3_NEXT.to_config({**qwen, "hidden_act": "gelu"})
    # mcore models the other architecture cannot hold.
    config = NEMOTRON_H.to_config(nemotron)
    sections = NEMOTRON_H.sections_from_hf(nemotron)
    with pytest.raises(NotImplementedError, match="Qwen3NextForCausalLM cannot express"):
        QWEN3_NEXT.from_config(config, sections)
    tied = dataclasses.replace(config, untie_embeddings_and_output_weights=False)
    with pytest.raises(NotImplementedError, match="tied embeddings"):
        NEMOTRON_H.from_config(tied, sections)
    ssm = dataclasses.replace(sections["ssm"], mamba_dt_limit_min=0.0)
    with pytest.raises(NotImplementedError, match="mamba_dt_limit_min"):
        NEMOTRON_H.from_config(config, {**sections, "ssm": ssm})


def test_ckpt_cli_imports_and_exports_a_hybrid_model(tmp_path) -> None:
    cli = pytest.importorskip("mcore.ckpt.cli")
    hf = make_hf("nemotron_h", tmp_path / "hf")
    ckpt = cli.import_hf(tmp_path / "hf", tmp_path / "mcore")
    cli.export_hf(ckpt, tmp_path / "out")  # the architecture it was imported from
    ids, _ = batch()
    with torch.no_grad():
        assert max_diff(reload_logits(tmp_path / "out", ids), hf(input_ids=ids).logits) < 1e-5
