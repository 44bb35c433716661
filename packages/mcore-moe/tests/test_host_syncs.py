"""A training step of an MoE model reads nothing data-dependent back to the host.

The step runs on the ``meta`` device (shapes, no data) under ``forbid_host_syncs``, where every
host read of device data raises: forward and backward with the balancing losses, the z-loss and
the aux-loss-free bias, then ``finalize_step`` and the accumulation of the statistics, with the
``allgather`` dispatcher, and with capacity, token dropping and padding. Single process (EP = 1,
so the dispatcher's collectives are skipped): meta tensors cannot cross a process group.
"""

from __future__ import annotations

import pytest
import torch

from mcore.core.host_syncs import HostSyncError, forbid_host_syncs
from mcore.models import GPTModel, TransformerConfig
from mcore.moe import MoEConfig
from mcore.moe.layer import MoELayer

VOCAB = 64

BALANCING = dict(
    aux_loss_coeff=1e-2,
    z_loss_coeff=1e-3,
    router_enable_expert_bias=True,
    router_score_function="sigmoid",
    router_norm_topk_prob=True,
)
CASES = {
    "allgather": dict(BALANCING),
    "allgather_seq_aux_loss": dict(BALANCING, router_load_balancing_type="seq_aux_loss"),
    "allgather_global_aux_loss": dict(BALANCING, router_load_balancing_type="global_aux_loss"),
    "capacity_drop_and_pad": dict(
        BALANCING,
        expert_capacity_factor=1.0,
        pad_expert_input_to_capacity=True,
        token_drop_policy="position",
        router_padding_for_quantization=True,
    ),
    "capacity_drop_squared_relu": dict(BALANCING, expert_capacity_factor=0.5),
}


def _model(activation: str = "swiglu", **moe) -> GPTModel:
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        ffn_hidden_size=32,
        vocab_size=VOCAB,
        activation=activation,
    )
    base = dict(
        num_experts=4,
        router_topk=2,
        token_dispatcher_type="allgather",
        shared_expert_intermediate_size=16,
    )
    torch.manual_seed(0)
    return GPTModel(cfg, sections={"moe": MoEConfig(**{**base, **moe})})


def _moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _train_step(model: torch.nn.Module, device: str, micro_batches: int = 2) -> None:
    """What the runtime does in one step: forward and backward of each micro-batch with the
    auxiliary losses scaled, then the MoE layers' ``finalize_step``."""
    model.train()
    for layer in _moe_layers(model):
        layer.aux_loss_scale = 1.0 / micro_batches
    for m in range(micro_batches):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(m))
        ids = ids.to(device)
        loss = model(ids, labels=ids).float().mean() / micro_batches
        loss.backward()
    for layer in _moe_layers(model):
        layer.finalize_step()


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_reads_nothing_back(case) -> None:
    moe = dict(CASES[case])
    activation = "squared_relu" if "squared_relu" in case else "swiglu"
    model = _model(activation, **moe).to("meta")
    with forbid_host_syncs():
        _train_step(model, "meta")
        _train_step(model, "meta")  # the statistics accumulate across steps on the device
        stats = [layer.read_statistics() for layer in _moe_layers(model)]
    for layer_stats in stats:
        assert set(layer_stats) == {
            "moe/load_balancing_loss",
            "moe/z_loss",
            "moe/expert_load_imbalance",
        }
        counts = {name: count for name, (_, count) in layer_stats.items()}
        # Two steps of two micro-batches; the load imbalance once per step.
        assert counts == {**dict.fromkeys(counts, 4), "moe/expert_load_imbalance": 2}
        assert all(total.device.type == "meta" for total, _ in layer_stats.values())


def test_the_harness_catches_a_host_read() -> None:
    """The same step raises once one module reads an activation on the host."""

    class Peek(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.detach().abs().max()) > 1e4:  # the kind of check that hides a sync
                raise FloatingPointError("activations blew up")
            return x

    model = _model(**CASES["allgather"])
    model.layers["0"].mlp.router.register_forward_pre_hook(lambda _m, args: Peek()(args[0]))
    model.to("meta")
    with forbid_host_syncs(), pytest.raises(HostSyncError, match="scalar read"):
        _train_step(model, "meta")


def test_the_harness_catches_a_copy_to_the_cpu() -> None:
    def log_to_host(_module, _inputs, out: torch.Tensor) -> None:
        out.detach().cpu()

    model = _model(**CASES["allgather"])
    model.layers["1"].register_forward_hook(log_to_host)
    model.to("meta")
    with forbid_host_syncs(), pytest.raises(HostSyncError, match="copied to the CPU"):
        _train_step(model, "meta")


def test_the_alltoall_dispatcher_keeps_one_host_read_its_split_sizes() -> None:
    model = _model(token_dispatcher_type="alltoall").to("meta")
    with forbid_host_syncs(), pytest.raises(HostSyncError) as raised:
        _train_step(model, "meta")
    assert "alltoall.py" in "".join(_frames(raised.value))


def _frames(error: BaseException) -> list[str]:
    import traceback

    return [frame.filename for frame in traceback.extract_tb(error.__traceback__)]


@pytest.mark.parametrize("case", ["capacity_drop_and_pad", "capacity_drop_squared_relu"])
def test_allgather_padding_rows_change_nothing(case) -> None:
    """Sized by a bound, the allgather dispatcher runs padding rows through the experts; on
    real data its outputs and gradients equal the alltoall dispatcher's, which sizes exactly."""
    results = []
    for dispatcher in ("allgather", "alltoall"):
        activation = "squared_relu" if "squared_relu" in case else "swiglu"
        model = _model(activation, **dict(CASES[case], token_dispatcher_type=dispatcher))
        _train_step(model, "cpu", micro_batches=1)
        grads = {n: p.grad for n, p in model.named_parameters()}
        stats = [_means(layer.read_statistics()) for layer in _moe_layers(model)]
        results.append((grads, stats))
    (grads, stats), (ref_grads, ref_stats) = results
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)
    for layer_stats, ref in zip(stats, ref_stats, strict=True):
        assert layer_stats == pytest.approx(ref)


def _means(stats: dict[str, tuple[torch.Tensor, int]]) -> dict[str, float]:
    return {name: float(total) / count for name, (total, count) in stats.items()}
