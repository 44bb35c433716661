"""Qwen3-Next's and Nemotron-H's multi-token-prediction depths through the Hugging Face
converters, against transformers as the numerical oracle.

Qwen3-Next (main layers GDN + MoE, gated attention + MoE; one depth, ``/*E`` in mcore): the
oracle is transformers' generic ``MtpModel`` built around the main model (with
``num_mtp_layers = 1`` and ``mtp_layer_types = ["full_attention"]`` set on the config, which
the released config.json does not state). The folder holds the depth as the released
checkpoints do (``mtp.fc``, ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``,
``mtp.layers.0.*``, ``mtp.norm``), and ``MtpModel.from_pretrained`` reads it back.

Nemotron-H (main layers ``M E``; two depths of ``mtp_layers_block_type = [full_attention,
moe]``, ``/*E/*E`` in mcore): transformers 5 has no MTP module for it (it ignores ``mtp.*``).
The layout is Megatron-Bridge's and vLLM's (``NemotronHBridge``'s MTP flattening and
``NemotronHMTP.load_weights``): depth ``k``'s block ``j`` is ``mtp.layers.{k * L + j}`` with
Nemotron-H's block names (``norm``, ``mixer.*``), the first block of a depth also holding
``enorm``, ``hnorm``, ``eh_proj`` and the last ``final_layernorm``. The oracle is a few lines
of torch around transformers' own ``NemotronHBlock`` and ``NemotronHRMSNorm`` with the formula
Megatron-LM and vLLM share: ``h_k = final_layernorm(blocks(eh_proj([enorm(embed(token[t + k])),
hnorm(h_{k-1})])))``, ``h_0`` the main model's final-normed hidden state.

For both, ``GPTModel.mtp_logits`` matches the oracle depth by depth after ``load_hf``, and
``save_hf`` writes the same tensors back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
MtpModel = pytest.importorskip("transformers.modeling_layers").MtpModel
pytest.importorskip("mcore.moe")

from safetensors.torch import load_file, save_file  # noqa: E402

from mcore.core.testing import randomise_weights  # noqa: E402
from mcore.models.hf import hf_state_dict, load_hf, read_hf_config, save_hf  # noqa: E402
from mcore.ssm.hf import NEMOTRON_H, QWEN3_NEXT  # noqa: E402

VOCAB, B, S = 64, 2, 12
QWEN3_NEXT_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    initializer_range=0.1,
    num_hidden_layers=2,
    # The last main layer is full attention: MtpModel takes its norm class from there.
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=40,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=6,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=20,
    norm_topk_prob=False,
)
NEMOTRON_H_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=32, initializer_range=0.1,
    layers_block_type=["linear_attention", "moe"], num_attention_heads=4, num_key_value_heads=2,
    head_dim=12, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=6, n_groups=2,
    ssm_state_size=8, chunk_size=8, use_bias=True, mamba_proj_bias=True, time_step_min=0.01,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=20, n_group=2, topk_group=1, routed_scaling_factor=1.5,
    norm_topk_prob=True, num_nextn_predict_layers=2,
    mtp_layers_block_type=["full_attention", "moe"],
)  # fmt: skip


def _saved_layers(config, layers: dict[int, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The file tensors transformers writes for decoder layers ``layers`` (by layer number) of a
    model with ``config``: it names fused experts one by one on save."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")  # only the layers set below are kept
    blocks = model.get_decoder().layers
    for n, layer in layers.items():
        blocks[n].load_state_dict(layer.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def _add_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    weights = folder / "model.safetensors"
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    save_file({**load_file(str(weights)), **tensors}, str(weights), metadata={"format": "pt"})


def _edit_config(folder: Path, **fields: object) -> None:
    """config.json with ``fields`` set (None removes one)."""
    hf = json.loads((folder / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    (folder / "config.json").write_text(json.dumps(hf))


def shifted(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Token ``t + k`` at position ``t``; the last ``k`` positions hold token 0."""
    return torch.cat([ids[:, k:], torch.zeros_like(ids[:, :k])], dim=1)


def assert_depths_match(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    """Each depth's logits where its shifted token exists (depth ``k``: the first ``S - k``)."""
    assert len(ours) == len(theirs) > 0
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a.shape == b.shape == (B, S, VOCAB)
        diff = (a[:, : S - k] - b[:, : S - k]).abs().max().item()
        assert diff < 1e-4, f"depth {k}: max abs diff {diff:.3g}"


def assert_same_files(saved: Path, original: Path) -> None:
    ours, theirs = (
        load_file(str(saved / "model.safetensors")),
        load_file(str(original / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(1))


# --- Qwen3-Next ----------------------------------------------------------------------------------


def qwen3_next_config(**overrides: object):
    config = transformers.Qwen3NextConfig(**{**QWEN3_NEXT_CONFIG, **overrides})
    # transformers' generic MTP fields; Qwen3NextConfig keeps them as extra attributes.
    config.num_mtp_layers = 1
    config.mtp_layer_types = ["full_attention"]
    return config


def make_qwen3_next(folder: Path):
    """The main model and its MTP depth, saved to ``folder`` in the released layout with
    ``num_nextn_predict_layers: 1`` in config.json; returns (main, mtp), fp32, eval."""
    torch.manual_seed(0)
    main = transformers.AutoModelForCausalLM.from_config(qwen3_next_config()).float().eval()
    randomise_weights(main, 0.1, skip=("model.embed_tokens", "lm_head"))
    mtp = MtpModel(main, 1).float().eval()
    randomise_weights(mtp, 0.1, skip=("embed_tokens", "shared_head", "rotary_emb"))
    main.save_pretrained(folder)
    # The MTP decoder layer saved as layer 2 of a model one full-attention layer longer.
    n = QWEN3_NEXT_CONFIG["num_hidden_layers"]
    longer = qwen3_next_config(
        num_hidden_layers=n + 1, layer_types=[*QWEN3_NEXT_CONFIG["layer_types"], "full_attention"]
    )
    saved = _saved_layers(longer, {n: mtp.layers[0].mtp_block})
    prefix = f"model.layers.{n}."
    layer = mtp.layers[0]
    _add_tensors(
        folder,
        {
            **{"mtp.layers.0." + k.removeprefix(prefix): v for k, v in saved.items()
               if k.startswith(prefix)},
            "mtp.fc.weight": layer.eh_proj.weight,
            "mtp.pre_fc_norm_embedding.weight": layer.enorm.weight,
            "mtp.pre_fc_norm_hidden.weight": layer.hnorm.weight,
            "mtp.norm.weight": layer.post_norm.weight,
        },
    )  # fmt: skip
    _edit_config(folder, num_nextn_predict_layers=1, num_mtp_layers=None, mtp_layer_types=None)
    return main, mtp


def load_qwen3_next(folder: Path):
    """transformers' main model and ``MtpModel`` from ``folder``."""
    main = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    main.config.num_mtp_layers = 1
    main.config.mtp_layer_types = ["full_attention"]
    return main, MtpModel.from_pretrained(main).float().eval()


def qwen3_next_reference(main, mtp, ids: torch.Tensor):
    """transformers' main logits and each depth's. ``MtpModel.forward`` drafts from inputs
    already one token ahead of the hidden states: over a whole sequence, depth ``k`` (1-based)
    sees the hidden states at ``t``, token ``t + k`` and position ``t + k``."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        out = main.model(input_ids=ids)
        hidden, depths = out.last_hidden_state, []  # after the final norm
        for k in range(1, mtp.num_mtp_layers + 1):
            ahead = shifted(ids, k)
            hidden = mtp.forward_layer(k - 1, hidden, positions + k, None, input_ids=ahead)
            depths.append(mtp._project_to_logits(hidden))
        return main.lm_head(out.last_hidden_state), depths


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_next_mtp")
    main, mtp = make_qwen3_next(folder)
    ids = batch()
    return folder, ids, qwen3_next_reference(main, mtp, ids)


def test_qwen3_next_folder_is_what_transformers_mtp_model_reads(qwen3_next) -> None:
    folder, ids, (_, depths) = qwen3_next
    assert_depths_match(qwen3_next_reference(*load_qwen3_next(folder), ids)[1], depths)


def test_qwen3_next_mtp_logits_match_transformers(qwen3_next) -> None:
    folder, ids, (logits, depths) = qwen3_next
    model = load_hf(folder).eval()
    assert model.config.hybrid_override_pattern == "GE*E/*E"
    # Zero-centred norms everywhere, the depth's own included.
    assert model.config.layernorm_zero_centered_gamma
    with torch.no_grad():
        assert (model(ids) - logits).abs().max().item() < 1e-4
        assert_depths_match(model.mtp_logits(ids), depths)


def test_qwen3_next_save_hf_writes_the_released_layout(qwen3_next, tmp_path) -> None:
    folder, ids, (_, depths) = qwen3_next
    save_hf(load_hf(folder), tmp_path)
    assert_same_files(tmp_path, folder)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == 1
    assert hf["num_mtp_layers"] == 1 and hf["mtp_layer_types"] == ["full_attention"]
    # transformers' MtpModel reads the export without help; mcore reads it back unchanged.
    main = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert_depths_match(qwen3_next_reference(main, MtpModel.from_pretrained(main), ids)[1], depths)
    assert read_hf_config(tmp_path).config == read_hf_config(folder).config
    again = load_hf(tmp_path).eval()
    with torch.no_grad():
        assert_depths_match(again.mtp_logits(ids), depths)


def _copy(folder: Path, to: Path, *, drop_mtp: bool = False, **fields: object) -> Path:
    """``folder`` copied to ``to`` with config.json ``fields`` changed and, with ``drop_mtp``,
    without the ``mtp.*`` tensors."""
    to.mkdir()
    (to / "config.json").write_text((folder / "config.json").read_text())
    _edit_config(to, **fields)
    tensors = load_file(str(folder / "model.safetensors"))
    if drop_mtp:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def test_qwen3_next_depth_comes_from_the_weights(qwen3_next, tmp_path) -> None:
    """The released config.json does not count the depth (vLLM assumes one): the weights do.
    A file without them (transformers drops ``mtp.*`` on load, and so on save) has none."""
    folder, ids, (_, depths) = qwen3_next
    silent = _copy(folder, tmp_path / "silent", num_nextn_predict_layers=None)
    model = load_hf(silent).eval()
    with torch.no_grad():
        assert_depths_match(model.mtp_logits(ids), depths)
    bare = _copy(folder, tmp_path / "bare", drop_mtp=True)
    assert read_hf_config(bare).config.hybrid_override_pattern == "GE*E"
    assert load_hf(bare).mtp is None
    off = _copy(folder, tmp_path / "off", num_nextn_predict_layers=0)
    assert read_hf_config(off).config.mtp_depth == 0


def test_qwen3_next_what_mcore_cannot_express_is_refused(qwen3_next) -> None:
    folder = qwen3_next[0]
    hf = json.loads((folder / "config.json").read_text())
    with pytest.raises(NotImplementedError, match="num_nextn_predict_layers = 2"):
        QWEN3_NEXT.to_config({**hf, "num_nextn_predict_layers": 2})
    with pytest.raises(NotImplementedError, match="mtp_layer_types"):
        QWEN3_NEXT.to_config({**hf, "mtp_layer_types": ["linear_attention"]})
    # HF layer 0 dense: the MTP layer's MLP is dense too, as transformers and vLLM build it.
    assert QWEN3_NEXT.to_config({**hf, "mlp_only_layers": [0]}).hybrid_override_pattern == (
        "G-*E/*-"
    )
    arch, config, sections = read_hf_config(folder)
    for pattern, what in (
        ("GE*E/*E/*E", "more than one MTP depth"),
        ("GE*E/*-", "an MTP MLP unlike layer 0's"),
        ("GE*E/GE", "MTP blocks other than"),
    ):
        with pytest.raises(NotImplementedError, match=what):
            arch.from_config(dataclasses.replace(config, hybrid_override_pattern=pattern), sections)


# --- Nemotron-H ----------------------------------------------------------------------------------


class NemotronHMtpOracle(torch.nn.Module):
    """Nemotron-H's MTP depths in torch around transformers' own blocks and norms (transformers
    has no Nemotron-H MTP): per depth ``enorm``, ``hnorm``, ``eh_proj``, the blocks of
    ``mtp_layers_block_type`` and ``final_layernorm``."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.nemotron_h.modeling_nemotron_h import (
            NemotronHBlock,
            NemotronHRMSNorm,
        )

        self.config = copy.deepcopy(config)
        self.config.layers_block_type = list(config.mtp_layers_block_type)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.depths = torch.nn.ModuleList()
        for _ in range(config.num_nextn_predict_layers):
            depth = torch.nn.Module()
            depth.enorm, depth.hnorm = NemotronHRMSNorm(h, eps), NemotronHRMSNorm(h, eps)
            depth.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
            depth.blocks = torch.nn.ModuleList(
                NemotronHBlock(self.config, j) for j in range(len(self.config.layers_block_type))
            )
            depth.final_layernorm = NemotronHRMSNorm(h, eps)
            self.depths.append(depth)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The depths' tensors in Megatron-Bridge's and vLLM's layout."""
        n, kinds = len(self.config.layers_block_type), self.config.layers_block_type
        # transformers names MoE experts one by one on save: save the blocks as the main
        # layers of a Nemotron-H with these block types, then number them on.
        longer = copy.deepcopy(self.config)
        longer.layers_block_type = kinds * len(self.depths)
        blocks = [b for depth in self.depths for b in depth.blocks]
        saved = _saved_layers(longer, dict(enumerate(blocks)))
        tensors = {
            k.replace("backbone.layers.", "mtp.layers.", 1): v
            for k, v in saved.items()
            if k.startswith("backbone.layers.")
        }
        for k, depth in enumerate(self.depths):
            first, last = f"mtp.layers.{k * n}", f"mtp.layers.{k * n + n - 1}"
            tensors[f"{first}.enorm.weight"] = depth.enorm.weight
            tensors[f"{first}.hnorm.weight"] = depth.hnorm.weight
            tensors[f"{first}.eh_proj.weight"] = depth.eh_proj.weight
            tensors[f"{last}.final_layernorm.weight"] = depth.final_layernorm.weight
        return tensors

    def forward(self, main, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The main model's logits and each depth's, from token ids ``ids``."""
        from transformers.masking_utils import create_causal_mask

        with torch.no_grad():
            hidden = main.model(input_ids=ids, use_cache=False).last_hidden_state  # after norm_f
            logits, depths = main.lm_head(hidden), []
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            for k, depth in enumerate(self.depths, start=1):
                embedded = main.model.embeddings(shifted(ids, k))
                x = depth.eh_proj(torch.cat([depth.enorm(embedded), depth.hnorm(hidden)], -1))
                mask = create_causal_mask(
                    config=self.config,
                    inputs_embeds=x,
                    attention_mask=None,
                    past_key_values=None,
                    position_ids=positions + k,
                )
                for block in depth.blocks:
                    x = block(x, attention_mask=mask if block.block_type == "full_attention"
                              else None, position_ids=positions + k)  # fmt: skip
                hidden = depth.final_layernorm(x)
                depths.append(main.lm_head(hidden))
        return logits, depths


def make_nemotron_h(folder: Path):
    """The main model and its two depths, saved to ``folder``; returns (main, oracle)."""
    config = transformers.NemotronHConfig(**NEMOTRON_H_CONFIG)
    torch.manual_seed(0)
    main = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomise_weights(main, 0.1, skip=("backbone.embeddings", "lm_head"))
    oracle = NemotronHMtpOracle(main.config).float().eval()
    randomise_weights(oracle, 0.1)
    main.save_pretrained(folder)
    _add_tensors(folder, oracle.file_tensors())
    return main, oracle


@pytest.fixture(scope="module")
def nemotron_h(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nemotron_h_mtp")
    main, oracle = make_nemotron_h(folder)
    ids = batch()
    return folder, ids, oracle(main, ids)


def test_nemotron_h_layout_is_megatron_bridges(nemotron_h) -> None:
    folder = nemotron_h[0]
    names = {k for k in load_file(str(folder / "model.safetensors")) if k.startswith("mtp.")}
    # Depth 0 is blocks 0 (attention) and 1 (MoE), depth 1 blocks 2 and 3.
    for first, last in ((0, 1), (2, 3)):
        assert {f"mtp.layers.{first}.{n}.weight" for n in ("enorm", "hnorm", "eh_proj")} <= names
        assert {f"mtp.layers.{first}.norm.weight", f"mtp.layers.{first}.mixer.q_proj.weight",
                f"mtp.layers.{first}.mixer.o_proj.weight"} <= names  # fmt: skip
        assert {f"mtp.layers.{last}.final_layernorm.weight", f"mtp.layers.{last}.norm.weight",
                f"mtp.layers.{last}.mixer.gate.e_score_correction_bias",
                f"mtp.layers.{last}.mixer.experts.3.up_proj.weight",
                f"mtp.layers.{last}.mixer.shared_experts.down_proj.weight"} <= names  # fmt: skip


def test_nemotron_h_mtp_logits_match_transformers_blocks(nemotron_h) -> None:
    folder, ids, (logits, depths) = nemotron_h
    model = load_hf(folder).eval()
    assert model.config.hybrid_override_pattern == "ME/*E/*E"
    with torch.no_grad():
        assert (model(ids) - logits).abs().max().item() < 1e-4
        assert_depths_match(model.mtp_logits(ids), depths)


def test_nemotron_h_save_hf_writes_the_same_layout(nemotron_h, tmp_path) -> None:
    folder, ids, (_, depths) = nemotron_h
    model = load_hf(folder)
    save_hf(model, tmp_path)
    assert_same_files(tmp_path, folder)
    assert hf_state_dict(model).keys() == load_file(str(folder / "model.safetensors")).keys()
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == 2
    assert hf["mtp_layers_block_type"] == ["full_attention", "moe"]
    assert hf["mtp_hybrid_override_pattern"] == "*E"
    # transformers reads the config (the legacy pattern beside the list is accepted).
    assert transformers.AutoConfig.from_pretrained(tmp_path).mtp_hybrid_override_pattern == "*E"
    assert read_hf_config(tmp_path).config == read_hf_config(folder).config
    with torch.no_grad():
        assert_depths_match(load_hf(tmp_path).eval().mtp_logits(ids), depths)


def test_nemotron_h_config_translation() -> None:
    hf = {**NEMOTRON_H_CONFIG, "num_nextn_predict_layers": 1}
    assert NEMOTRON_H.to_config(hf).hybrid_override_pattern == "ME/*E"
    # Megatron-Bridge's field for the block; legacy layer type names.
    legacy = {**hf, "mtp_layers_block_type": None, "mtp_hybrid_override_pattern": "*-"}
    assert NEMOTRON_H.to_config(legacy).hybrid_override_pattern == "ME/*-"
    renamed = {**hf, "mtp_layers_block_type": ["attention", "mlp"]}
    assert NEMOTRON_H.to_config(renamed).hybrid_override_pattern == "ME/*-"
    # An MoE MTP block needs the [moe] section even where the main layers have none.
    dense = {**hf, "layers_block_type": ["linear_attention", "mlp"]}
    assert NEMOTRON_H.sections_from_hf(dense)["moe"].num_experts == 4
    # Without MTP, as before.
    assert NEMOTRON_H.to_config({**hf, "num_nextn_predict_layers": 0}).mtp_depth == 0
    with pytest.raises(NotImplementedError, match="mtp_layers_block_type"):
        NEMOTRON_H.to_config({**hf, "mtp_layers_block_type": ["cross_attention"]})
    # One block type list for every depth: depths that differ cannot be written.
    config, sections = NEMOTRON_H.to_config(hf), NEMOTRON_H.sections_from_hf(hf)
    differing = dataclasses.replace(config, hybrid_override_pattern="ME/*E/*-")
    with pytest.raises(NotImplementedError, match="MTP depths with different blocks"):
        NEMOTRON_H.from_config(differing, sections)
