"""mcore MoE models against Hugging Face ``transformers`` as the numerical oracle.

Each case builds a small HF MoE model (Mixtral, Qwen2-MoE with a gated shared expert,
Qwen3-MoE, DeepSeek-V3 with MLA, grouped sigmoid routing and a non-zero expert-score bias)
from a config with random weights, saves it, loads it with ``mcore.models.hf.load_hf`` and
compares logits: on one process, and on gloo ranks under expert parallelism (EP 2 and 4,
EP 2 x ETP 2) with both token dispatchers. Every run also writes the model back with
``save_hf`` and checks that ``transformers`` loads it with the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mcore.core import get_plugin_manager, hookimpl  # noqa: E402
from mcore.core.testing import run_ranks  # noqa: E402
from mcore.models.hf import load_hf, read_hf_config, save_hf  # noqa: E402
from mcore.moe import hf as moe_hf  # noqa: E402
from mcore.parallel import ParallelState  # noqa: E402

ARCHITECTURES = (moe_hf.MIXTRAL, moe_hf.QWEN2_MOE, moe_hf.QWEN3_MOE, moe_hf.DEEPSEEK_V3)


class _MoEArchitectures:
    """Registers the MoE architectures where mcore-moe's plugin does not (yet) do so."""

    @hookimpl
    def mcore_register(self, registry) -> None:
        for arch in ARCHITECTURES:
            registry.add("hf_architecture", arch.name, arch)


def setup_module() -> None:
    if "DeepseekV3ForCausalLM" not in get_plugin_manager().registries["hf_architecture"]:
        get_plugin_manager().register(_MoEArchitectures(), "moe-hf-architectures")


SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 1.0},
)  # fmt: skip
CASES = {
    # Softmax over 8 experts, top 2 renormalised; every layer MoE.
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8)),
    # A gated shared expert, qkv bias, un-normalised top-k, layer 0 dense.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
             num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0]),
    ),
    # qk-norm, normalised top-k, no shared expert.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, head_dim=16),
    ),
    # MLA with a q LoRA, yarn; sigmoid scores, 4 groups of 2 of which 2 are kept, top 3, scaled;
    # a shared expert; layer 0 dense.
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(**MLA, q_lora_rank=16, intermediate_size=48, moe_intermediate_size=24,
             n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1),
    ),
    # Every layer dense: MLA without a q LoRA, interleaved rope and yarn on their own.
    "deepseek_v3_dense": (
        "DeepseekV3Config",
        dict(**MLA, q_lora_rank=None, intermediate_size=48, moe_intermediate_size=24,
             n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
             first_k_dense_replace=2),
    ),
}  # fmt: skip
B, S = 2, 12


def make_hf(case: str, folder: Path):
    config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            router = getattr(layer.mlp, "gate", None)
            # transformers initialises the bias at zero; a random one checks it is used.
            if router is not None and hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SMALL["vocab_size"], (B, S), generator=g)


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    ids = batch()
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    return request.param, folder, ids, logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def reload_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model ``transformers`` loads from ``folder``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


ALL_CASES = pytest.mark.parametrize("case", list(CASES), indirect=True)


@ALL_CASES
def test_single_process_matches_transformers(case) -> None:
    _, folder, ids, logits = case
    model = load_hf(folder).eval()
    with torch.no_grad():
        assert max_diff(model(ids), logits) < 1e-4


@ALL_CASES
def test_save_hf_round_trips_through_transformers(case, tmp_path) -> None:
    _, folder, ids, logits = case
    save_hf(load_hf(folder), tmp_path)
    assert max_diff(reload_logits(tmp_path, ids), logits) < 1e-4
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == original["architectures"]


def _parallel_run(rank, world, folder, ids, out, tp, ep, etp, sp, dispatcher):
    ps = ParallelState(tp=tp, ep=ep, etp=etp)
    model = load_hf(
        folder,
        ps,
        sequence_parallel=sp,
        section_overrides={"moe": {"token_dispatcher_type": dispatcher}},
    ).eval()
    with torch.no_grad():
        logits = model(ids)
    save_hf(model, out)  # gathers experts over ETP and EP
    return logits if rank == 0 else None


LAYOUTS = {
    "ep2_alltoall": dict(world=2, tp=1, ep=2, etp=1, sp=False, dispatcher="alltoall"),
    "ep2_allgather": dict(world=2, tp=1, ep=2, etp=1, sp=False, dispatcher="allgather"),
    "ep4_allgather": dict(world=4, tp=1, ep=4, etp=1, sp=False, dispatcher="allgather"),
    "ep4_alltoall": dict(world=4, tp=1, ep=4, etp=1, sp=False, dispatcher="alltoall"),
    "ep2_etp2_alltoall": dict(world=4, tp=1, ep=2, etp=2, sp=False, dispatcher="alltoall"),
    "ep2_etp2_allgather": dict(world=4, tp=1, ep=2, etp=2, sp=False, dispatcher="allgather"),
    # MoE layers under TP need sequence parallelism (each rank routes its sequence shard); the
    # experts then split over ETP = TP.
    "tp2_sp": dict(world=2, tp=2, ep=1, etp=None, sp=True, dispatcher="alltoall"),
    "tp2": dict(world=2, tp=2, ep=1, etp=None, sp=False, dispatcher="alltoall"),
}

# Every architecture under EP with both dispatchers between them, EP 4 and EP 2 x ETP 2 twice
# each; DeepSeek's MLA (with and without MoE layers) also under TP 2.
PAIRS = [
    ("mixtral", "ep4_allgather"),
    ("mixtral", "ep2_etp2_alltoall"),
    ("qwen2_moe", "ep2_alltoall"),
    ("qwen2_moe", "ep2_etp2_allgather"),
    ("qwen3_moe", "ep2_allgather"),
    ("qwen3_moe", "ep4_alltoall"),
    ("deepseek_v3", "ep2_etp2_alltoall"),
    ("deepseek_v3", "ep4_allgather"),
    ("deepseek_v3", "tp2_sp"),
    ("deepseek_v3_dense", "tp2"),
    ("deepseek_v3_dense", "tp2_sp"),
]


@pytest.mark.parametrize(("case", "layout"), PAIRS, indirect=["case"])
def test_parallel_layouts_match_transformers(case, layout, tmp_path) -> None:
    _, folder, ids, logits = case
    lay = LAYOUTS[layout]
    our_logits = run_ranks(
        _parallel_run, lay["world"], folder, ids, tmp_path, lay["tp"], lay["ep"], lay["etp"],
        lay["sp"], lay["dispatcher"], backend="gloo",
    )[0]  # fmt: skip
    assert max_diff(our_logits, logits) < 1e-4
    assert max_diff(reload_logits(tmp_path, ids), logits) < 1e-4


# --- config translation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"], indirect=True
)
def test_config_json_round_trips(case, tmp_path) -> None:
    """config.json -> mcore -> config.json -> mcore gives the same model and sections."""
    _, folder, _, _ = case
    arch, config, sections = read_hf_config(folder)
    (tmp_path / "config.json").write_text(json.dumps(arch.from_config(config, sections)))
    again = read_hf_config(tmp_path)
    assert again.architecture is arch
    assert again.config == config
    assert again.sections == sections


def test_qwen_sparse_steps_and_dense_prefixes_become_first_k_dense_and_layer_freq() -> None:
    base = dict(num_hidden_layers=6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)

    def pattern(**hf):
        moe = moe_hf.QWEN3_MOE.sections_from_hf({**base, **hf})["moe"]
        return moe.first_k_dense, moe.layer_freq

    assert pattern() == (0, 1)
    assert pattern(decoder_sparse_step=2) == (1, 2)  # layers 1, 3, 5
    assert pattern(mlp_only_layers=[0, 1]) == (2, 1)
    assert pattern(decoder_sparse_step=2, mlp_only_layers=[0, 1]) == (3, 2)  # layers 3, 5
    with pytest.raises(NotImplementedError, match="mlp_only_layers"):
        pattern(mlp_only_layers=[2])


def test_what_mcore_cannot_express_is_refused_by_name() -> None:
    qwen3 = {**SMALL, "intermediate_size": 48, "num_experts": 4, "moe_intermediate_size": 8}
    with pytest.raises(NotImplementedError, match="attention_bias"):
        moe_hf.QWEN3_MOE.to_config({**qwen3, "attention_bias": True})
    with pytest.raises(NotImplementedError, match="sliding_window"):
        moe_hf.MIXTRAL.to_config({**SMALL, "intermediate_size": 48, "sliding_window": 4096})
    deepseek = {**SMALL, **MLA, "intermediate_size": 48}
    with pytest.raises(NotImplementedError, match="rope_interleave"):
        moe_hf.DEEPSEEK_V3.to_config({**deepseek, "rope_interleave": False})
    with pytest.raises(NotImplementedError, match="num_key_value_heads"):
        moe_hf.DEEPSEEK_V3.to_config({**deepseek, "num_key_value_heads": 2})
    hf = {**deepseek, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1}
    config, sections = moe_hf.DEEPSEEK_V3.to_config(hf), moe_hf.DEEPSEEK_V3.sections_from_hf(hf)
    with pytest.raises(NotImplementedError, match="MixtralForCausalLM cannot express"):
        moe_hf.MIXTRAL.from_config(config, sections)
