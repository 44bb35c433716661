"""``mcore plan``: per-rank parameters, gradients and optimizer state against hand formulas, the
activation figure against a real CPU run, ``--json``, and the errors of a bad layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mcore.core import ConfigError, load_config
from mcore.core.cli import main
from mcore.core.plugins import get_plugin_manager
from mcore.parallel import ParallelLayoutError
from mcore.parallel.plan import make_plan
from mcore.parallel.plan.activations import measure_chunk
from mcore.parallel.plan.stage import build_stage, fake_world

H, F, V, HEADS = 64, 128, 256, 4
DENSE = {
    "model.num-layers": "2",
    "model.hidden-size": str(H),
    "model.num-attention-heads": str(HEADS),
    "model.ffn-hidden-size": str(F),
    "model.vocab-size": str(V),
    "train.bf16": "true",
    "train.seq-length": "64",
    "ddp.bucket-size-mb": "1000",  # one bucket: the padding rule stays a one-liner below
}
E, FE, TOPK = 8, 32, 2
MOE = {**DENSE, "moe.num-experts": str(E), "moe.ffn-hidden-size": str(FE), "moe.router-topk": "2"}


def plan(overrides: dict[str, str], world: int):
    return make_plan(load_config(None, overrides), world)


def layer(tp: int, moe_ep: int | None = None) -> tuple[int, int]:
    """(dense, expert) parameters of one layer on one rank: norms and router replicated,
    projections split over TP, experts over EP."""
    attention = (H * 3 * H + H * H) // tp
    if moe_ep is None:
        return 2 * H + attention + 3 * H * F // tp, 0
    return 2 * H + attention + E * H, E // moe_ep * 3 * H * FE


def adam(n: int) -> int:
    """fp32 main copy of a bf16 parameter and Adam's two fp32 moments."""
    return 12 * n


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (1, 2)])
def test_dense_ddp_figures_match_hand_formulas(tp: int, pp: int) -> None:
    world = 8
    p = plan({**DENSE, "parallel.tp": str(tp), "parallel.pp": str(pp)}, world)
    per_layer, _ = layer(tp)
    embedding = V * H // tp
    first = embedding + 2 // pp * per_layer + (H if pp == 1 else 0)
    last = per_layer + H + embedding  # the last stage's copy of the tied embedding
    expected = [first] if pp == 1 else [first, last]
    assert [r.num_params for r in p.roles] == expected
    for role, n in zip(p.roles, expected, strict=True):
        assert role.params_bytes == 2 * n  # bf16
        assert role.grads_bytes == 2 * n  # bf16 buffers (no grad_reduce_in_fp32)
        assert role.optimizer_bytes == adam(n)
        assert role.optimizer_cpu_bytes == 0


@pytest.mark.parametrize("pp", [1, 2])
def test_mtp_depths_are_counted_on_the_last_stage(pp: int) -> None:
    """Two MTP depths: per depth two norms, the replicated 2h x h projection, one layer and
    its output norm; with pp 2 the last stage already holds the tied embedding's copy."""
    p = plan({**DENSE, "parallel.pp": str(pp), "model.mtp-num-layers": "2"}, 8)
    base = plan({**DENSE, "parallel.pp": str(pp)}, 8)
    per_layer, _ = layer(1)
    per_depth = 2 * H + 2 * H * H + per_layer + H
    assert p.roles[-1].num_params == base.roles[-1].num_params + 2 * per_depth
    if pp == 2:
        assert p.roles[0].num_params == base.roles[0].num_params
    assert p.model_flops_per_token > base.model_flops_per_token


def test_distributed_optimizer_shards_main_weights_and_state_over_dp() -> None:
    world = dp = 4
    p = plan({**DENSE, "optimizer.use-distributed-optimizer": "true"}, world)
    (role,) = p.roles
    n = V * H + 2 * layer(1)[0] + H
    padded = math.ceil(n / (dp * 64)) * dp * 64  # buckets pad to dp x 64-element shards
    assert role.params_bytes == 2 * padded  # parameters live in the padded flat buffer
    assert role.grads_bytes == 2 * padded
    assert role.optimizer_bytes == adam(min(padded // dp, n))  # rank 0's shard


def test_fsdp_shards_each_parameter_along_dim_0() -> None:
    world = dp = 4
    overrides = {
        **DENSE,
        "train.data-parallel": "megatron_fsdp",
        "fsdp.data-parallel-sharding-strategy": "optim_grads_params",
    }
    (role,) = plan(overrides, world).roles
    model = load_config(None, overrides)
    with fake_world(0, world):
        chunk = build_stage(model, model.model, get_plugin_manager().registries).chunks[0]
        shard = sum(
            math.ceil(q.shape[0] / dp) * (q.numel() // q.shape[0]) for q in chunk.parameters()
        )
    assert role.params_bytes == 4 * shard  # fp32 main shards, no persistent compute copy
    assert role.grads_bytes == 4 * shard
    assert role.optimizer_bytes == 8 * shard  # the mains are the parameters: moments only
    assert role.transient_model_bytes > 0  # layers gathered in bf16 for compute


def test_cpu_offload_moves_main_weights_and_state_off_the_gpu() -> None:
    overrides = {**DENSE, "optimizer.optimizer-cpu-offload": "true"}
    (role,) = plan(overrides, 2).roles
    assert role.optimizer_bytes == 0
    assert role.optimizer_cpu_bytes == adam(role.num_params)


@pytest.mark.parametrize("ep,tp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_moe_figures_count_experts_per_ep_rank(ep: int, tp: int) -> None:
    world = 8
    overrides = {**MOE, "parallel.ep": str(ep), "parallel.tp": str(tp)}
    if tp > 1:
        overrides["parallel.sequence-parallel"] = "true"
        overrides["parallel.etp"] = "1"
    (role,) = plan(overrides, world).roles
    dense, expert = layer(tp, moe_ep=ep)
    n = V * H // tp + 2 * (dense + expert) + H
    assert role.num_params == n
    assert role.expert_params == 2 * expert
    assert role.params_bytes == 2 * n
    assert role.grads_bytes == 2 * n
    assert role.optimizer_bytes == adam(n)


def test_moe_distributed_optimizer_shards_experts_over_edp() -> None:
    world, ep = 8, 2
    edp = world // ep
    overrides = {**MOE, "parallel.ep": str(ep), "optimizer.use-distributed-optimizer": "true"}
    (role,) = plan(overrides, world).roles
    dense, expert = layer(1, moe_ep=ep)
    n_dense, n_expert = V * H + 2 * dense + H, 2 * expert
    pad_dense = math.ceil(n_dense / (world * 64)) * world * 64
    pad_expert = math.ceil(n_expert / (edp * 64)) * edp * 64
    assert role.grads_bytes == 2 * (pad_dense + pad_expert)
    shard = min(pad_dense // world, n_dense) + min(pad_expert // edp, n_expert)
    assert role.optimizer_bytes == adam(shard)


def _saved_bytes_of_a_real_cpu_run(overrides: dict[str, str]) -> int:
    """Bytes autograd keeps for backward (plus the loss) in a real bf16 CPU forward."""
    config = load_config(None, overrides)
    registries = get_plugin_manager().registries
    torch.manual_seed(0)
    model = registries.get("model", "gpt")(config.model, None, sections=config)
    model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, V, (2, config.train.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids)
    return sum(saved.values()) + loss.untyped_storage().nbytes()


@pytest.mark.parametrize(
    "overrides",
    [
        DENSE,
        MOE,
        {**DENSE, "model.recompute-granularity": "full"},
        {**MOE, "model.mtp-num-layers": "2"},
    ],
    ids=["dense", "moe", "full-recompute", "moe-mtp"],
)
def test_activation_figure_matches_a_real_cpu_run(overrides: dict[str, str]) -> None:
    config = load_config(None, {**overrides, "train.micro-batch-size": "2"})
    with fake_world(0, 1):
        chunk = build_stage(config, config.model, get_plugin_manager().registries).chunks[0]
        figures = measure_chunk(
            chunk.to(device="meta", dtype=torch.bfloat16),
            micro_batch_size=2,
            seq_length=config.train.seq_length,
            hidden_size=H,
            dtype=torch.bfloat16,
            sequence_parallel_tp=1,
            cp=1,
        )
    real = _saved_bytes_of_a_real_cpu_run(overrides)
    assert abs(figures.kept - real) <= 0.15 * real, (figures.kept, real)
    assert figures.peak >= figures.kept


def _cli_args(overrides: dict[str, str]) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", v)]


def test_json_gives_the_plan_as_data(capsys) -> None:
    args = ["plan", "--world-size", "4", "--json", *_cli_args({**DENSE, "parallel.pp": "2"})]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 4 and data["layout"]["dp"] == 2
    assert [r["pp_rank"] for r in data["roles"]] == [0, 1]
    role = data["roles"][0]
    assert set(role["comm_bytes_per_step"]) == {"tp", "cp", "ep", "pp", "dp"}
    assert role["total_bytes"] > role["params_bytes"] > 0 and data["fits"] is True


def test_table_names_every_stage(capsys) -> None:
    assert main(["plan", "--world-size", "2", *_cli_args({**DENSE, "parallel.pp": "2"})]) == 0
    out = capsys.readouterr().out
    assert "0 (first)" in out and "1 (last)" in out and "fits: yes" in out


def test_bad_layouts_fail_with_the_errors_train_gives(capsys) -> None:
    overrides = {**DENSE, "parallel.tp": "3"}
    with pytest.raises(ConfigError) as train_error:
        load_config(None, overrides)
    assert main(["plan", "--world-size", "6", *_cli_args(overrides)]) != 0
    assert train_error.value.errors[0] in capsys.readouterr().err
    with pytest.raises(ParallelLayoutError, match="world size 6 is not divisible"):
        plan({**DENSE, "parallel.tp": "4"}, 6)
    with pytest.raises(ParallelLayoutError, match="num_layers"):
        plan({**DENSE, "parallel.pp": "4"}, 4)
