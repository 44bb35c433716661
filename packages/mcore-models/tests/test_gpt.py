"""GPTModel on one process: shapes, loss, specs from registries, recompute, MLA."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages the ops create (``excluded`` ones aside) that are still alive."""

    def __init__(self, excluded) -> None:
        super().__init__()
        self.excluded = {t.untyped_storage()._cdata for t in excluded}
        self.alive: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage, key = t.untyped_storage(), t.untyped_storage()._cdata
                if key not in self.excluded and key not in self.alive:
                    self.alive[key] = storage.nbytes()
                    weakref.finalize(storage, self.alive.pop, key, None)
        return out


def _forward_memory(model, ids, labels) -> tuple[list[tuple[int, torch.Size]], int]:
    """What ``model``'s forward leaves for backward (parameters excluded): the ``(bytes,
    shape)`` of each storage autograd saved (packed by a saved-tensor hook; its whole bytes,
    the shape of the first tensor saved from it), and the bytes of all storages the forward
    created that are still alive once it returns (saved or held any other way).

    Inside a non-reentrant ``checkpoint`` the checkpoint's own (innermost) hook packs, so the
    tensors it drops are not seen; the inputs it keeps to recompute from are (torch saves
    them outside that hook), as is everything saved outside the recomputed regions."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # data_ptr -> (bytes, shape); saved tensors stay alive with the loss

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), t.shape))
        return t

    live = _LiveStorages(model.parameters())
    with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels).mean()
    alive = sum(live.alive.values())
    del loss
    return list(saved.values()), alive


def _recompute_memory(tiny, granularity, num_layers, b, s):
    config = tiny(num_layers=num_layers, recompute_granularity=granularity)
    torch.manual_seed(0)
    return _forward_memory(GPTModel(config), *_batch(config, b=b, s=s))


def test_full_recompute_keeps_only_each_layers_input(tiny) -> None:
    """Full recompute really frees each layer's activations: per layer, autograd saves only
    the layer's input ``[s, b, h]`` (what the checkpoint recomputes from) and nothing else
    stays alive, against many such tensors without recompute. Per-layer figures are the
    difference between a 4- and a 2-layer model, which cancels the embedding and the head."""
    b, s = 2, 32
    layer_input = s * b * tiny().hidden_size * 4  # one fp32 [s, b, h]
    saved, alive = {}, {}
    for g in (None, "full"):
        for n in (2, 4):
            tensors, alive[g, n] = _recompute_memory(tiny, g, n, b, s)
            saved[g, n] = sum(nbytes for nbytes, _ in tensors)
    for figures in (saved, alive):
        per_layer = {g: (figures[g, 4] - figures[g, 2]) / 2 for g in (None, "full")}
        assert 0 <= per_layer["full"] <= layer_input, (per_layer, layer_input)
        assert per_layer[None] >= 8 * layer_input, (per_layer, layer_input)
        # The whole model too, head included: a small fraction of what no recompute keeps.
        assert figures["full", 4] < figures[None, 4] / 4, figures
        assert figures["full", 2] < figures[None, 2] / 2, figures


def test_selective_recompute_frees_the_attention_probabilities(tiny) -> None:
    """Selective recompute drops what the attention kernel saves: with torch's math SDPA
    (the one that materialises the ``[b, heads, s, s]`` probabilities; the CPU flash kernel
    saves only a log-sum-exp) no recompute keeps one such tensor per layer, selective none,
    and keeps less in all (though more than full recompute)."""
    b, s, layers = 2, 32, 2  # s != head_dim (16): [.., s, s] is no other tensor's shape
    with sdpa_kernel(SDPBackend.MATH):
        memory = {g: _recompute_memory(tiny, g, layers, b, s) for g in (None, "selective")}
    memory["full"] = _recompute_memory(tiny, "full", layers, b, s)
    scores = {g: sum(shape[-2:] == (s, s) for _, shape in m[0]) for g, m in memory.items()}
    assert scores == {None: layers, "selective": 0, "full": 0}, scores
    for figures in (
        {g: sum(nbytes for nbytes, _ in m[0]) for g, m in memory.items()},
        {g: m[1] for g, m in memory.items()},
    ):
        assert figures["full"] < figures["selective"] < figures[None], figures


@pytest.mark.parametrize("granularity", [None, "full", "selective"])
def test_recompute_reruns_forwards_in_backward(granularity, tiny) -> None:
    """Recompute really re-runs forwards during ``backward``: full recompute runs each
    layer's forward (and so its attention kernel) once more, selective only each attention
    kernel, no recompute nothing; the forward itself runs everything once either way."""
    config = tiny(recompute_granularity=granularity)
    torch.manual_seed(0)
    model = GPTModel(config)
    layer_calls: dict[str, int] = dict.fromkeys(model.layers, 0)
    kernel_calls: dict[str, int] = dict.fromkeys(model.layers, 0)

    def count_layer(name):
        def hook(module, args):
            layer_calls[name] += 1

        return hook

    def count_kernel(name, kernel):
        def counted(*args, **kwargs):
            kernel_calls[name] += 1
            return kernel(*args, **kwargs)

        return counted

    for name, layer in model.layers.items():
        layer.register_forward_pre_hook(count_layer(name))
        core = layer.self_attention.core_attention
        core.kernel = count_kernel(name, core.kernel)

    ids, labels = _batch(config)
    loss = model(ids, labels=labels).mean()
    assert set(layer_calls.values()) == {1} and set(kernel_calls.values()) == {1}
    layer_calls.update(dict.fromkeys(layer_calls, 0))
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    loss.backward()
    again = {None: (0, 0), "full": (1, 1), "selective": (0, 1)}[granularity]
    assert layer_calls == dict.fromkeys(model.layers, again[0]), layer_calls
    assert kernel_calls == dict.fromkeys(model.layers, again[1]), kernel_calls


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
