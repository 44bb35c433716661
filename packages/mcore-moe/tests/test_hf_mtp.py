"""DeepSeek-V3's multi-token-prediction depths through the Hugging Face converters, against
transformers' generic ``MtpModel`` as the numerical oracle.

A tiny DeepSeek-V3 (MLA with a q LoRA and yarn, grouped sigmoid routing with a score bias, a
shared expert, layer 0 dense) gets two MTP depths. Its folder holds the main model as
transformers saves it plus the depths in DeepSeek's released layout (depth ``k`` as
``model.layers.{num_hidden_layers + k}.*``: the MoE decoder layer with its experts one by one,
``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``); transformers' own ``MtpModel`` loads
it back, which shows the layout is the one its conversion reads. ``load_hf`` then gives
``GPTModel.mtp_logits`` equal to ``MtpModel.forward_layer`` depth by depth, on one process and
under TP 2 with sequence parallelism; ``save_hf`` writes the same tensors back, which
transformers' ``MtpModel`` loads with the same logits. config.json's count is checked against
the files: a declared depth without weights (what transformers writes) is dropped, weights
without a count (Qwen3-Next's released files do that) are read as one depth.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
MtpModel = pytest.importorskip("transformers.modeling_layers").MtpModel

from safetensors.torch import load_file, save_file  # noqa: E402

from mcore.core.testing import randomise_weights, run_ranks  # noqa: E402
from mcore.models.hf import hf_state_dict, load_hf, read_hf_config, save_hf  # noqa: E402
from mcore.moe.hf import DEEPSEEK_V3  # noqa: E402
from mcore.parallel import ParallelState  # noqa: E402

LAYERS, DEPTHS, VOCAB, B, S = 2, 2, 96, 2, 12
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.1,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 1.0},
    intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1,
    first_k_dense_replace=1, num_nextn_predict_layers=DEPTHS,
)  # fmt: skip
MTP_LAYERS = tuple(range(LAYERS, LAYERS + DEPTHS))
"""The HF layer numbers of the MTP depths."""


def _mtp_file_tensors(mtp) -> dict[str, torch.Tensor]:
    """The depths' tensors under DeepSeek's file names. transformers writes a decoder layer's
    experts one by one on save: a model with the depths' decoder layers appended as layers
    ``LAYERS + k`` saves them in the released layout; the per-depth tensors are added."""
    import tempfile

    config = transformers.DeepseekV3Config(
        **{**CONFIG, "num_hidden_layers": LAYERS + DEPTHS, "num_nextn_predict_layers": 0}
    )
    with torch.device("meta"):
        big = transformers.AutoModelForCausalLM.from_config(config)
    big.to_empty(device="cpu")  # only the appended layers are kept
    tensors = {}
    for k, n in enumerate(MTP_LAYERS):
        big.model.layers[n].load_state_dict(mtp.layers[k].mtp_block.state_dict())
        layer = mtp.layers[k]
        tensors.update(
            {
                f"model.layers.{n}.enorm.weight": layer.enorm.weight,
                f"model.layers.{n}.hnorm.weight": layer.hnorm.weight,
                f"model.layers.{n}.eh_proj.weight": layer.eh_proj.weight,
                f"model.layers.{n}.shared_head.norm.weight": layer.post_norm.weight,
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        big.save_pretrained(tmp)
        saved = load_file(str(Path(tmp) / "model.safetensors"))
    prefixes = tuple(f"model.layers.{n}." for n in MTP_LAYERS)
    tensors.update({k: v for k, v in saved.items() if k.startswith(prefixes)})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def make_hf(folder: Path):
    """The tiny model and its depths, saved to ``folder``; returns (main, mtp), fp32, eval."""
    config = transformers.DeepseekV3Config(**CONFIG)
    torch.manual_seed(0)
    main = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomise_weights(main, 0.1, skip=("model.embed_tokens", "lm_head"))
    mtp = MtpModel(main, DEPTHS).float().eval()
    randomise_weights(mtp, 0.1, skip=("embed_tokens", "shared_head", "rotary_emb"))
    main.save_pretrained(folder)
    weights = folder / "model.safetensors"
    save_file({**load_file(str(weights)), **_mtp_file_tensors(mtp)}, str(weights),
              metadata={"format": "pt"})  # fmt: skip
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == DEPTHS
    return main, mtp


def load_transformers(folder: Path):
    """transformers' main model and ``MtpModel`` from ``folder``."""
    main = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    # MtpModel finds its tensors by the main model's ignore patterns, which name DeepSeek-V3's
    # layer 61; this model's depths are layers 2 and 3.
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\." for n in MTP_LAYERS]
    return main, MtpModel.from_pretrained(main).float().eval()


def shifted(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Token ``t + k`` at position ``t``; the last ``k`` positions hold token 0."""
    return torch.cat([ids[:, k:], torch.zeros_like(ids[:, :k])], dim=1)


def reference(main, mtp, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' main logits and each depth's. ``MtpModel.forward`` drafts from inputs
    already one token ahead of the hidden states and moves both one place per depth: over a
    whole sequence, depth ``k`` (1-based) sees hidden states at ``t``, token ``t + k`` and
    position ``t + k``."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        out = main.model(input_ids=ids)
        hidden = out.last_hidden_state  # after the final norm
        depths = []
        for k in range(1, mtp.num_mtp_layers + 1):
            hidden = mtp.forward_layer(
                k - 1, hidden, positions + k, None, input_ids=shifted(ids, k)
            )
            depths.append(mtp._project_to_logits(hidden))
        return main.lm_head(out.last_hidden_state), depths


def assert_depths_match(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    """Each depth's logits where its shifted token exists (depth ``k``: the first ``S - k``)."""
    assert len(ours) == len(theirs) == DEPTHS
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a.shape == b.shape == (B, S, VOCAB)
        diff = (a[:, : S - k] - b[:, : S - k]).abs().max().item()
        assert diff < 1e-4, f"depth {k}: max abs diff {diff:.3g}"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek_v3_mtp")
    main, mtp = make_hf(folder)
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(1))
    return folder, ids, reference(main, mtp, ids)


def test_the_folder_is_what_transformers_mtp_model_reads(case) -> None:
    folder, ids, (logits, depths) = case
    main, mtp = load_transformers(folder)
    again_logits, again = reference(main, mtp, ids)
    torch.testing.assert_close(again_logits, logits, rtol=0, atol=0)
    for a, b in zip(again, depths, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mtp_logits_match_transformers(case) -> None:
    folder, ids, (logits, depths) = case
    model = load_hf(folder).eval()
    assert model.config.mtp_num_layers == DEPTHS and model.mtp.depth == DEPTHS
    # The MTP block is an MoE layer, as transformers' (it forces first_k_dense_replace = 0).
    assert hasattr(model.mtp.layers[0].block[0].mlp, "router")
    with torch.no_grad():
        assert (model(ids) - logits).abs().max().item() < 1e-4
        assert_depths_match(model.mtp_logits(ids), depths)


def assert_same_files(saved: Path, original: Path) -> None:
    """The two folders' model.safetensors hold the same tensors, bit for bit."""
    ours = load_file(str(saved / "model.safetensors"))
    theirs = load_file(str(original / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


def test_save_hf_writes_the_released_layout_back(case, tmp_path) -> None:
    folder, ids, (_, depths) = case
    model = load_hf(folder).eval()
    save_hf(model, tmp_path)
    assert_same_files(tmp_path, folder)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == DEPTHS
    # transformers' MtpModel loads the export; mcore loads it back unchanged.
    main, mtp = load_transformers(tmp_path)
    assert_depths_match(reference(main, mtp, ids)[1], depths)
    again = load_hf(tmp_path).eval()
    with torch.no_grad():
        assert_depths_match(again.mtp_logits(ids), depths)
    assert hf_state_dict(again).keys() == load_file(str(tmp_path / "model.safetensors")).keys()


def _tp_run(rank, world, folder, ids, out):
    model = load_hf(folder, ParallelState(tp=world), sequence_parallel=True).eval()
    with torch.no_grad():
        depths = model.mtp_logits(ids)
    save_hf(model, out)  # gathers the TP shards and experts over ETP
    return depths if rank == 0 else None


def test_tensor_parallel_matches_transformers(case, tmp_path) -> None:
    folder, ids, (_, depths) = case
    assert_depths_match(run_ranks(_tp_run, 2, folder, ids, tmp_path, backend="gloo")[0], depths)
    assert_same_files(tmp_path, folder)


# --- config.json against the files ---------------------------------------------------------------


def _copy(folder: Path, to: Path, *, config: dict | None = None, drop_mtp: bool = False) -> Path:
    """``folder`` copied to ``to`` with config.json fields changed (None removes one) and,
    with ``drop_mtp``, without the depths' tensors (as transformers saves the main model)."""
    to.mkdir()
    hf = json.loads((folder / "config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    (to / "config.json").write_text(json.dumps(hf))
    tensors = load_file(str(folder / "model.safetensors"))
    if drop_mtp:
        prefixes = tuple(f"model.layers.{n}." for n in MTP_LAYERS)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def test_declared_depths_without_weights_are_dropped(case, tmp_path) -> None:
    folder, ids, (logits, _) = case
    bare = _copy(folder, tmp_path / "bare", drop_mtp=True)
    assert read_hf_config(bare).config.mtp_depth == 0
    model = load_hf(bare).eval()
    assert model.mtp is None
    with torch.no_grad():
        assert (model(ids) - logits).abs().max().item() < 1e-4
    save_hf(model, tmp_path / "out")
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    )


def test_weights_without_a_count_are_one_depth(case, tmp_path) -> None:
    folder = case[0]
    silent = _copy(folder, tmp_path / "silent", config={"num_nextn_predict_layers": None})
    assert read_hf_config(silent).config.mtp_depth == 1
    # The alias transformers also reads; an explicit 0 ignores the weights.
    alias = _copy(folder, tmp_path / "alias", config={"num_nextn_predict_layers": None,
                                                      "num_mtp_layers": 2})  # fmt: skip
    assert read_hf_config(alias).config.mtp_depth == 2
    off = _copy(folder, tmp_path / "off", config={"num_nextn_predict_layers": 0})
    assert read_hf_config(off).config.mtp_depth == 0
    # Without weight files config.json is taken at its word.
    hf = json.loads((folder / "config.json").read_text())
    assert DEEPSEEK_V3.to_config(hf).mtp_num_layers == DEPTHS


def test_mtp_after_a_dense_last_layer_is_refused(case, tmp_path) -> None:
    """transformers' MTP layers are MoE layers whatever first_k_dense_replace says; mcore's are
    built like the last main layer, which is dense when every layer is."""
    folder = case[0]
    dense = _copy(folder, tmp_path / "dense", config={"first_k_dense_replace": LAYERS})
    with pytest.raises(NotImplementedError, match="num_nextn_predict_layers = 2"):
        load_hf(dense)
    # What transformers saves for such a config (its default of one depth, no MTP tensors)
    # loads, without MTP.
    config = transformers.DeepseekV3Config(**{**CONFIG, "first_k_dense_replace": LAYERS})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bare")
    assert load_hf(tmp_path / "bare").mtp is None
    # Export refuses an mcore model whose MTP block is dense.
    arch, config, sections = read_hf_config(folder)
    all_dense = {**sections, "moe": dataclasses.replace(sections["moe"], first_k_dense=LAYERS)}
    with pytest.raises(NotImplementedError, match="dense last layer"):
        arch.from_config(config, all_dense)
