"""GPTModel on one process: shapes, loss, specs from registries, recompute, MLA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcore.core import McoreError, PluginManager, hookimpl
from mcore.models import GPTModel, LayerSpec
from mcore.models.mlp import MLP


def _batch(config, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, config.vocab_size, (b, s), generator=g)
    return ids, labels


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"untie_embeddings_and_output_weights": True},
        {"add_qkv_bias": True, "qk_layernorm": True},
        {"activation": "gelu", "normalization": "LayerNorm", "add_bias_linear": True},
        {"activation": "squared_relu", "position_embedding_type": "learned_absolute"},
        {"multi_latent_attention": True, "q_lora_rank": 32, "kv_lora_rank": 16,
         "qk_head_dim": 8, "qk_pos_emb_head_dim": 8, "v_head_dim": 12},
    ],
)  # fmt: skip
def test_logits_and_loss_agree(overrides, tiny) -> None:
    config = tiny(**overrides)
    torch.manual_seed(0)
    model = GPTModel(config)
    ids, labels = _batch(config)
    logits = model(ids)
    assert logits.shape == (2, 16, config.vocab_size)
    loss = model(ids, labels=labels)
    assert loss.shape == (2, 16)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(loss, expected.view(2, 16), rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings_share_one_tensor(config, tiny) -> None:
    model = GPTModel(config)
    assert "output_layer.weight" not in model.state_dict()
    untied = GPTModel(tiny(untie_embeddings_and_output_weights=True))
    assert "output_layer.weight" in untied.state_dict()


def test_same_seed_same_model(tiny) -> None:
    config = tiny()
    torch.manual_seed(3)
    a = GPTModel(config).state_dict()
    torch.manual_seed(3)
    b = GPTModel(config).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_gives_the_same_gradients(granularity, tiny) -> None:
    ids, labels = _batch(tiny())
    grads = []
    for recompute in (None, granularity):
        torch.manual_seed(0)
        model = GPTModel(tiny(recompute_granularity=recompute))
        model(ids, labels=labels).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7)


def test_a_plugin_swaps_the_mlp_through_the_spec(tiny) -> None:
    calls = []

    class CountingMLP(MLP):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    class Plugin:
        @hookimpl
        def mcore_register(self, registry):
            registry.add("mlp", "counting", CountingMLP)

    manager = PluginManager().load_entry_points(only=["mcore-models"])
    manager.register(Plugin(), name="counting-mlp")
    config = tiny()
    model = GPTModel(config, spec=LayerSpec(mlp="counting"), registries=manager.registries)
    assert all(isinstance(layer.mlp, CountingMLP) for layer in model.layers.values())
    model(_batch(config)[0])
    assert len(calls) == config.num_layers


def test_unknown_module_in_a_spec_names_what_exists(config) -> None:
    with pytest.raises(McoreError, match="unknown attention 'flash9'. Known: mla, self_attention"):
        GPTModel(config, spec=LayerSpec(attention="flash9"))


def test_bad_shapes_fail_at_construction(tiny) -> None:
    with pytest.raises(McoreError, match="num_query_groups"):
        GPTModel(tiny(num_query_groups=3))
    with pytest.raises(ValueError, match="vocab_size must be set"):
        GPTModel(tiny(vocab_size=None))


def test_te_backend_falls_back_to_sdpa_with_one_log_line(caplog, tiny) -> None:
    config = tiny(attention_backend="te")
    with caplog.at_level("WARNING"):
        GPTModel(config)
        GPTModel(config)
    te_lines = [r for r in caplog.records if "attention_backend 'te'" in r.getMessage()]
    assert len(te_lines) <= 1  # one line per process (zero if an earlier test already warned)
    model = GPTModel(config)
    kernel = model.layers["0"].self_attention.core_attention.kernel
    assert type(kernel).__name__ == "SDPAAttention"
