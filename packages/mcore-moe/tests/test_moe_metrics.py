"""MoE statistics reach the logs at log intervals, merged over ranks, with the right values.

Two data-parallel gloo ranks train a small MoE model for two steps through the runtime's
``read_metrics`` (what the training loop calls at a log step); the values must equal the mean,
over ranks, layers, steps and micro-batches, of the losses and expert load computed by hand from
what each router chose. A dense model's read runs no collective at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mcore.core import load_config
from mcore.core.testing import run_ranks
from mcore.models import GPTModel, TransformerConfig
from mcore.moe import MoEConfig
from mcore.parallel.training import MeshTrainingRuntime

VOCAB, EXPERTS, TOPK, STEPS, MICRO_BATCHES = 64, 4, 2, 2, 2


def _runtime() -> MeshTrainingRuntime:
    return MeshTrainingRuntime(load_config(overrides={"train.device": "cpu"}))


def _model(runtime: MeshTrainingRuntime, moe: MoEConfig | None) -> GPTModel:
    cfg = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, vocab_size=VOCAB
    )
    torch.manual_seed(0)
    sections = {"moe": moe} if moe is not None else None
    return GPTModel(cfg, runtime.parallel_state, sections=sections)


def _count_collectives() -> list[str]:
    """Every torch.distributed collective called from now on, by name."""
    calls: list[str] = []
    for name in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return calls


def _dense_read(rank: int, world: int) -> tuple[dict, list[str]]:
    runtime = _runtime()
    model = _model(runtime, None)
    calls = _count_collectives()
    metrics = [runtime.read_metrics([model]) for _ in range(3)]
    return metrics, calls


def test_a_model_without_statistics_reads_no_metrics_and_runs_no_collective() -> None:
    for metrics, calls in run_ranks(_dense_read, 2, backend="gloo", timeout_s=120):
        assert metrics == [{}, {}, {}]
        assert calls == []


def _moe_training(rank: int, world: int, bias: bool) -> tuple[dict, list, list[str]]:
    """Two steps of two micro-batches on this rank's data, then one read; returns the metrics,
    what every router saw and chose, and the collectives of the read."""
    runtime = _runtime()
    moe = MoEConfig(
        num_experts=EXPERTS,
        router_topk=TOPK,
        token_dispatcher_type="allgather",
        aux_loss_coeff=1e-2,
        z_loss_coeff=1e-3,
        router_score_function="sigmoid" if bias else "softmax",
        router_enable_expert_bias=bias,
        per_layer_logging=True,
    )
    model = _model(runtime, moe).train()
    routed: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    now = {"step": 0}

    def record(router, _inputs, out) -> None:
        chosen = (out.logits.detach(), out.scores.detach(), out.indices)
        routed.append((now["step"], router.layer_number, *chosen))

    for layer in model.layers.values():
        layer.mlp.router.register_forward_hook(record)
    moe_layers = [layer.mlp for layer in model.layers.values()]
    for step in range(STEPS):
        now["step"] = step
        for m in range(MICRO_BATCHES):
            g = torch.Generator().manual_seed(100 * rank + 10 * step + m)
            ids = torch.randint(0, VOCAB, (2, 8), generator=g)
            model(ids, labels=ids).mean().backward()
        for layer in moe_layers:
            layer.finalize_step(runtime.parallel_state)
    calls = _count_collectives()
    metrics = runtime.read_metrics([model])
    return metrics, routed, calls


def _expected(routed_by_rank: list[list]) -> dict[str, float]:
    """The statistics from each router's logits, scores and choices, written plainly."""
    values: dict[str, list[float]] = {}
    loads: dict[tuple[int, int], torch.Tensor] = {}
    for routed in routed_by_rank:
        for step, layer, logits, scores, indices in routed:
            tokens = logits.shape[0]
            counts = torch.bincount(indices.reshape(-1), minlength=EXPERTS).double()
            f, p = counts / (tokens * TOPK), scores.double().mean(dim=0)
            z = torch.logsumexp(logits.double(), dim=-1).square().mean()
            for name, v in (("load_balancing_loss", EXPERTS * (f * p).sum()), ("z_loss", z)):
                values.setdefault(f"moe/{name}", []).append(float(v))
                values.setdefault(f"moe/layer{layer}/{name}", []).append(float(v))
            loads[step, layer] = loads.get((step, layer), 0) + counts  # over ranks and batches
    for (_, layer), load in loads.items():
        imbalance = float(load.max() / load.mean())
        values.setdefault("moe/expert_load_imbalance", []).append(imbalance)
        values.setdefault(f"moe/layer{layer}/expert_load_imbalance", []).append(imbalance)
    return {name: sum(v) / len(v) for name, v in values.items()}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "aux_loss_free_bias"])
def test_moe_statistics_are_the_interval_mean_over_every_rank(bias) -> None:
    results = run_ranks(_moe_training, 2, bias, backend="gloo", timeout_s=120)
    expected = _expected([routed for _, routed, _ in results])
    assert len(expected) == 9  # three statistics: overall, and for each of the two layers
    for metrics, _, calls in results:
        assert metrics == pytest.approx(expected, rel=1e-5)
        # One all-reduce merges the ranks; without the bias update each layer's expert load
        # waited for the read, and is summed over the data-parallel ranks there.
        assert calls == ["all_reduce"] * (1 if bias else 3)
