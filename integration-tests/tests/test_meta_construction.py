"""Models are built on ``meta`` and each rank materialises only what it holds.

The allocation test builds one rank of a TP4 x EP4 MoE model on a fake 16-rank process group
(torch's ``fake`` backend: real group objects, no peers) and records every tensor the build
allocates: none may be as large as the full tensor of any sharded parameter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from mcore.core.testing import run_ranks
from mcore.models import GPTModel, TransformerConfig
from mcore.moe import MoEConfig
from mcore.parallel import ParallelState
from mcore.parallel.init import TILE, materialize, set_init
from mcore.parallel.sharding import model_sharded_tensors


class _Allocations(TorchDispatchMode):
    """Every new tensor an op returns (outputs that alias an input are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, outs, strict=False):
            is_new = isinstance(value, torch.Tensor) and ret.alias_info is None
            if is_new and value.device.type != "meta":
                self.numels.append(value.numel())
        return out


def _moe_config() -> tuple[TransformerConfig, MoEConfig]:
    config = TransformerConfig(
        num_layers=2,
        hidden_size=512,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=1024,
        vocab_size=2048,
    )
    return config, MoEConfig(num_experts=8, ffn_hidden_size=512, router_topk=2)


def _with_fake_ranks(world: int, rank: int, fn):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        return fn()
    finally:
        dist.destroy_process_group()


def test_a_rank_never_allocates_a_full_sharded_tensor() -> None:
    config, moe = _moe_config()

    def build():
        ps = ParallelState(tp=4, ep=4, device_type="cpu")
        torch.manual_seed(0)
        with _Allocations() as allocations:
            model = GPTModel(config, ps, sequence_parallel=True, sections={"moe": moe})
        return model, allocations.numels

    model, numels = _with_fake_ranks(16, 5, build)
    sharded = {
        key: math.prod(t.global_shape)
        for key, t in model_sharded_tensors([model]).items()
        if t.local_numel < math.prod(t.global_shape)
    }
    # Dense TP layers, embedding and output, and both expert stacks are sharded here.
    assert any("experts.linear_fc1" in k for k in sharded)
    assert any("linear_qkv" in k for k in sharded)
    assert min(sharded.values()) > math.prod(TILE)  # so a tile is not itself a full tensor
    # Take away the storage of each tensor the rank holds: what is left is scratch, and no
    # piece of scratch is as large as any full sharded tensor.
    scratch = list(numels)
    for tensor in [*model.parameters(), *model.buffers()]:
        scratch.remove(tensor.numel())
    assert max(scratch) < min(sharded.values())
    held = sum(p.numel() for p in model.parameters())
    # Each held element is allocated once, drawn in a tile and staged in a strip: about 3x.
    assert sum(numels) < 4 * held, (sum(numels), held)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def test_meta_build_then_materialize_equals_a_direct_build() -> None:
    config, moe = _moe_config()
    torch.manual_seed(3)
    direct = GPTModel(config, sections={"moe": moe})
    torch.manual_seed(3)
    with torch.device("meta"):
        late = GPTModel(config, sections={"moe": moe})
    assert all(p.is_meta for p in late.parameters())
    materialize(late, device="cpu", seed=late.init_seed)
    for key, value in _weights(direct).items():
        assert torch.equal(value, late.state_dict()[key]), key
    # Norms start at one, biases and the aux-loss-free bias at zero; the rest is N(0, 0.02^2).
    assert torch.equal(direct.final_layernorm.weight, torch.ones(512))
    assert abs(direct.layers["0"].self_attention.linear_qkv.weight.std().item() - 0.02) < 1e-3


def test_materialize_without_initialize_draws_nothing() -> None:
    config, _ = _moe_config()
    with torch.device("meta"):
        model = GPTModel(config)
    state = torch.get_rng_state()
    calls = []

    class _Draws(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "normal" in func.__name__ or "uniform" in func.__name__:
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with _Draws():
        materialize(model, device="cpu", seed=1, initialize=False)
    assert not calls
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(state, torch.get_rng_state())


def test_a_meta_parameter_without_a_recipe_is_named() -> None:
    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.known = set_init(torch.nn.Parameter(torch.empty(4)), torch.nn.init.ones_)
            self.scale = torch.nn.Parameter(torch.empty(4))

    with torch.device("meta"):
        module = Custom()
    with pytest.raises(ValueError, match="'scale' was built on the meta device without an init"):
        materialize(module, device="cpu", seed=0)


def _tp_ep_weights(rank: int, world: int) -> dict[str, list]:
    """This rank's pieces of every tensor, from a TP2 x EP2 build (4 ranks)."""
    config, moe = _moe_config()
    ps = ParallelState(tp=2, ep=2)
    torch.manual_seed(11)
    model = GPTModel(config, ps, sequence_parallel=True, sections={"moe": moe})
    out = {}
    for key, sharded in model_sharded_tensors([model]).items():
        out[key] = [(view.clone(), offset) for view, offset in sharded.pieces]
    return out


def test_every_layout_draws_the_same_global_weights() -> None:
    config, moe = _moe_config()
    torch.manual_seed(11)
    single = GPTModel(config, sections={"moe": moe}).state_dict()
    for per_rank in run_ranks(_tp_ep_weights, 4, backend="gloo"):
        for key, pieces in per_rank.items():
            for view, offset in pieces:
                box = single[key]
                for dim, (start, size) in enumerate(zip(offset, view.shape, strict=True)):
                    box = box.narrow(dim, start, size)
                assert torch.equal(box, view), key
