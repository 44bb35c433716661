"""A dense GPT training step reads nothing data-dependent back to the host.

The step (the single-stage schedule: forward, loss and backward of two micro-batches) runs on
the ``meta`` device under ``forbid_host_syncs``, where every host read of device data raises.
"""

from __future__ import annotations

import pytest
import torch

from mcore.core.host_syncs import HostSyncError, forbid_host_syncs
from mcore.models import GPTModel
from mcore.parallel.pipeline.schedules import forward_backward_no_pipelining


def _micro_batches(config, count: int, device: str):
    for m in range(count):
        g = torch.Generator().manual_seed(m)
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=g)
        yield {"tokens": ids.to(device), "labels": ids.roll(-1, dims=1).to(device)}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["tokens"], labels=batch["labels"])

    def loss_func(losses: torch.Tensor):
        loss = losses.float().mean()
        return loss, {"loss": loss.detach()}  # kept on the device: the loop reads it

    return per_token, loss_func


def _train_step(model: GPTModel, config, device: str) -> list:
    return forward_backward_no_pipelining(
        forward_step_func=_forward_step,
        data_iterator=_micro_batches(config, 2, device),
        model=model,
        num_microbatches=2,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "gelu", "normalization": "LayerNorm", "add_bias_linear": True},
        {"position_embedding_type": "learned_absolute", "qk_layernorm": True},
        {"recompute_granularity": "full"},
    ],
)
def test_a_dense_training_step_reads_nothing_back(overrides, tiny) -> None:
    config = tiny(**overrides)
    torch.manual_seed(0)
    model = GPTModel(config).to("meta")
    with forbid_host_syncs():
        metrics = _train_step(model, config, "meta")
    assert len(metrics) == 2
    assert all(p.grad is not None for p in model.parameters())


def test_the_harness_catches_a_host_read(tiny) -> None:
    """A finiteness check on the host each micro-batch (a common habit) is caught."""

    def check_finite(_module, _inputs, out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            raise FloatingPointError("non-finite activations")

    config = tiny()
    torch.manual_seed(0)
    model = GPTModel(config)
    model.final_layernorm.register_forward_hook(check_finite)
    model.to("meta")
    with forbid_host_syncs(), pytest.raises(HostSyncError, match="scalar read"):
        _train_step(model, config, "meta")
