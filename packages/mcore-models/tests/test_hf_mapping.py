"""The Hugging Face weight map on its own: row transforms, expert slicing, config translation.

End-to-end parity with ``transformers`` lives in integration-tests (test_hf_parity.py and
test_moe_hf_parity.py); these tests pin down the pieces those rely on.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mcore.core import McoreError
from mcore.core.testing import run_ranks
from mcore.models import GPTModel
from mcore.models.hf import (
    Deinterleave,
    ParamMap,
    _local_tensor,
    _SafetensorsReader,
    default_architecture,
    hf_state_dict,
    load_hf,
    read_hf_config,
    save_hf,
)
from mcore.models.hf.architectures import LLAMA, rope_from_hf, rope_to_hf
from mcore.models.rope import apply_rotary, rope_frequencies


def interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rope: pairs ``(x[2j], x[2j+1])`` rotate by frequency ``j``; the result is
    written as halves, as transformers' ``apply_rotary_pos_emb_interleave`` does."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def test_deinterleaved_rows_make_rotate_half_rope_equal_interleaved_rope(tiny) -> None:
    nope, rope, heads, hidden = 6, 8, 3, 16
    cfg = tiny(rotary_base=500.0)
    inv_freq, _ = rope_frequencies(rope, cfg)
    freqs = torch.arange(5.0)[:, None] * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    weight = torch.randn(heads * (nope + rope), hidden)  # a q projection in HF's layout
    x = torch.randn(5, hidden)
    rows = Deinterleave(block=nope + rope, start=nope, size=rope)

    theirs = (x @ weight.t()).view(5, heads, -1)[..., nope:]
    ours = (x @ rows.to_mcore(weight).t()).view(5, heads, -1)[..., nope:]
    expected = interleaved_rope(theirs.transpose(0, 1), cos, sin)
    torch.testing.assert_close(apply_rotary(ours.transpose(0, 1), cos, sin), expected)
    # The nope rows are untouched, and saving restores HF's order.
    torch.testing.assert_close(
        rows.to_mcore(weight).view(heads, -1, hidden)[:, :nope],
        weight.view(heads, -1, hidden)[:, :nope],
    )
    torch.testing.assert_close(rows.to_hf(rows.to_mcore(weight)), weight)


def test_deinterleave_refuses_a_split_head() -> None:
    rows = Deinterleave(block=6, start=2, size=4)
    with pytest.raises(ValueError, match="whole blocks"):
        rows.to_mcore(torch.zeros(9, 2))
    with pytest.raises(ValueError, match="even"):
        Deinterleave(block=6, start=2, size=3)


def test_param_map_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="one HF tensor"):
        ParamMap("layers.{i}.x.weight", ("a.{i}", "b.{i}"), "row")
    with pytest.raises(ValueError, match="expert maps"):
        ParamMap("layers.{i}.x.weight", ("a.{i}.{e}",), "column")
    with pytest.raises(ValueError, match="only per-layer"):
        ParamMap("x.weight", ("a",), "replicated", layers=(1,))
    pm = ParamMap("layers.{i}.x.weight", ("a.{i}",), "replicated", layers=(1, 3))
    assert pm.layer_numbers(4) == [1, 3]


def test_expert_map_reads_this_ranks_experts_and_shard(tmp_path) -> None:
    """EP rank 1 of 2 holds experts 2 and 3; ETP rank 1 of 2 the second half of each part."""
    from safetensors.torch import save_file

    ffn, hidden = 4, 3
    tensors = {}
    for e in range(4):
        tensors[f"x.{e}.gate"] = torch.full((ffn, hidden), 10.0 * e) + torch.arange(ffn)[:, None]
        tensors[f"x.{e}.up"] = -tensors[f"x.{e}.gate"]
        tensors[f"x.{e}.down"] = torch.arange(hidden * ffn, dtype=torch.float).view(hidden, ffn) + e
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = _SafetensorsReader(tmp_path)
    ps = SimpleNamespace(ep_rank=1, ep_size=2, etp_rank=1, etp_size=2, etp_group=None)

    fc1 = ParamMap("fc1", ("x.{e}.gate", "x.{e}.up"), "column", experts=4, group="etp")
    local = _local_tensor(reader, fc1, fc1.hf, ps)
    assert local.shape == (2, ffn, hidden)  # 2 local experts, [gate half | up half]
    for j, e in enumerate((2, 3)):
        gate, up = tensors[f"x.{e}.gate"][2:], tensors[f"x.{e}.up"][2:]
        torch.testing.assert_close(local[j], torch.cat([gate, up]))

    fc2 = ParamMap("fc2", ("x.{e}.down",), "row", experts=4, group="etp")
    local = _local_tensor(reader, fc2, fc2.hf, ps)
    torch.testing.assert_close(local, torch.stack([tensors[f"x.{e}.down"][:, 2:] for e in (2, 3)]))


def test_parts_split_each_block_of_one_tensor_on_its_own(tmp_path) -> None:
    """One HF tensor of blocks [4, 4, 2] rows (Mamba's in_proj is [z, x, B, C, dt]): TP rank r
    of 2 holds the r-th half of every block, in block order."""
    from safetensors.torch import save_file

    whole = torch.arange(10.0)[:, None].repeat(1, 3)
    save_file({"w": whole, "odd": torch.zeros(9, 3)}, str(tmp_path / "model.safetensors"))
    reader = _SafetensorsReader(tmp_path)
    pm = ParamMap("w", ("w",), "column", parts=(4, 4, 2))
    for rank, rows in ((0, [0, 1, 4, 5, 8]), (1, [2, 3, 6, 7, 9])):
        ps = SimpleNamespace(tp_rank=rank, tp_size=2, tp_group=None)
        torch.testing.assert_close(_local_tensor(reader, pm, pm.hf, ps), whole[rows])
    ps = SimpleNamespace(tp_rank=0, tp_size=2, tp_group=None)
    with pytest.raises(McoreError, match="blocks"):
        _local_tensor(reader, ParamMap("w", ("odd",), "column", parts=(4, 3, 2)), ("odd",), ps)
    with pytest.raises(ValueError, match="parts"):
        ParamMap("w", ("w",), "row", parts=(4, 4, 2))
    with pytest.raises(ValueError, match="parts"):
        ParamMap("w", ("a", "b"), "column", parts=(4, 4, 2))
    # Saving regroups the ranks' shares block by block back into HF's order.
    shards = run_ranks(_gather_blocks, 2, whole, backend="gloo")
    for full in shards:
        torch.testing.assert_close(full, whole)


def _gather_blocks(rank: int, world: int, whole: torch.Tensor) -> torch.Tensor:
    from mcore.models.hf import _gather_shards

    rows = [[0, 1, 4, 5, 8], [2, 3, 6, 7, 9]][rank]
    return _gather_shards(whole[rows], "column", [4, 4, 2], None, world, 0)


def test_yarn_follows_transformers_use_of_mscale() -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    both = rope_from_hf({"rope_parameters": {**yarn, "mscale": 0.7, "mscale_all_dim": 1.0}})
    assert (both["yarn_mscale"], both["yarn_mscale_all_dim"]) == (0.7, 1.0)
    # transformers ignores mscale without mscale_all_dim.
    alone = rope_from_hf({"rope_parameters": {**yarn, "mscale": 0.7}})
    assert (alone["yarn_mscale"], alone["yarn_mscale_all_dim"]) == (1.0, 0.0)
    # DeepSeek's files may leave the factor to the two lengths.
    ratio = rope_from_hf(
        {"max_position_embeddings": 64, "rope_parameters": {**yarn, "factor": None}}
    )
    assert ratio["rope_scaling_factor"] == 4.0
    for bad, field in (
        ({"attention_factor": 2.0}, "attention_factor"),
        ({"truncate": False}, "truncate"),
        ({"mscale_all_dim": 1.0}, "mscale_all_dim"),
    ):
        with pytest.raises(NotImplementedError, match=field):
            rope_from_hf({"rope_parameters": {**yarn, **bad}})


def test_rope_round_trips_through_config_json(tiny) -> None:
    cfg = tiny(
        rope_scaling="yarn",
        rope_scaling_factor=4.0,
        rope_original_max_position_embeddings=16,
        yarn_mscale=0.8,
        yarn_mscale_all_dim=0.8,
    )
    back = rope_from_hf(rope_to_hf(cfg))
    assert back["yarn_mscale"] == 0.8 and back["yarn_mscale_all_dim"] == 0.8
    assert (
        back["rope_scaling_factor"] == 4.0 and back["rope_original_max_position_embeddings"] == 16
    )


class _EveryOtherMoE:
    """A stand-in for another package's section that turns odd layers into MoE layers."""

    def mlp_for_layer(self, layer_number: int) -> str | None:
        return "moe" if layer_number % 2 else None


def test_dense_architectures_refuse_layers_they_cannot_hold(tiny) -> None:
    with pytest.raises(NotImplementedError, match="layer 1 has a 'moe' MLP"):
        LLAMA.from_config(tiny(), {"moe": _EveryOtherMoE()})
    with pytest.raises(NotImplementedError, match="multi-latent"):
        LLAMA.from_config(tiny(multi_latent_attention=True), {})


def test_default_architecture_needs_a_name_for_mla(tiny) -> None:
    mla = GPTModel(
        tiny(multi_latent_attention=True, kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4,
             v_head_dim=8)
    )  # fmt: skip
    with pytest.raises(McoreError, match="architecture="):
        default_architecture(mla)
    assert default_architecture(GPTModel(tiny())) == "LlamaForCausalLM"


def test_dense_round_trip_reads_no_sections(tiny, tmp_path) -> None:
    model = GPTModel(tiny(untie_embeddings_and_output_weights=True))
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    arch, config, sections = read_hf_config(tmp_path)
    assert arch.name == "LlamaForCausalLM" and sections == {}
    assert config.num_layers == model.config.num_layers
    loaded = load_hf(tmp_path)
    for name, tensor in hf_state_dict(model).items():
        torch.testing.assert_close(hf_state_dict(loaded)[name], tensor)
    with pytest.raises(McoreError, match=r"names \[moe\]"):
        load_hf(tmp_path, section_overrides={"moe": {"router_topk": 1}})
