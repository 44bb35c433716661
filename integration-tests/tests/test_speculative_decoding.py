"""Speculative decoding with multi-token-prediction depths in the dynamic engine.

Small dense, MoE and hybrid (Mamba-2) models with two MTP depths are trained here for a few
seconds on a token stream where each token follows from the two before it by a random table,
which they learn in part: their MTP depths draft often but not always right, so both
acceptance and rejection happen.
With speculation on, greedy outputs equal plain greedy decoding token for token (chunked
prefill and preemption in play); sampled outputs keep the model's distribution, checked against
plain sampling with a chi-squared test; drafts are counted per position in the stats.
"""

from __future__ import annotations

import math

import pytest
import torch

from mcore.inference import DynamicInferenceEngine, InferenceConfig, SamplingParams
from mcore.inference.errors import InvalidRequestError
from mcore.models import GPTModel, TransformerConfig

VOCAB = 48
# Each token follows from the two before it: x[t + 1] = RULE[x[t - 1], x[t]].
RULE = torch.randint(0, VOCAB, (VOCAB, VOCAB), generator=torch.Generator().manual_seed(7))


def _config(**overrides) -> TransformerConfig:
    base = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, vocab_size=VOCAB, max_position_embeddings=256, mtp_num_layers=2,
        mtp_loss_scaling_factor=1.0,
    )  # fmt: skip
    return TransformerConfig(**{**base, **overrides})


def _sections(kind: str) -> dict:
    if kind == "moe":
        from mcore.moe import MoEConfig

        return {"moe": MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=64)}
    if kind == "hybrid":
        from mcore.ssm.config import SSMConfig

        ssm = SSMConfig(
            mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=8
        )  # fmt: skip
        return {"ssm": ssm}
    return {}


def rule_batch(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, seq + 1]`` sequences of the rule from random first pairs."""
    out = torch.empty(batch, seq + 1, dtype=torch.long)
    out[:, :2] = torch.randint(0, VOCAB, (batch, 2), generator=generator)
    for t in range(2, seq + 1):
        out[:, t] = RULE[out[:, t - 2], out[:, t - 1]]
    return out


def train_model(kind: str, steps: int = 60, mtp_factor: float = 1.0) -> GPTModel:
    """A model of ``kind`` (dense, moe, hybrid) trained on the rule's stream, main loss and
    MTP loss (weighted ``mtp_factor``) together."""
    overrides = {"mtp_loss_scaling_factor": mtp_factor}
    if kind == "hybrid":
        overrides.update(hybrid_override_pattern="M*-M/*-/*-", num_layers=4)
    torch.manual_seed(0)
    model = GPTModel(_config(**overrides), sections=_sections(kind))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = rule_batch(16, 32, g)
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.mtp.read_statistics()
    return model.eval()


@pytest.fixture(scope="module", params=["dense", "moe", "hybrid"])
def trained(request) -> tuple[str, GPTModel]:
    return request.param, train_model(request.param)


def _engine(model: GPTModel, spec: int, **overrides) -> DynamicInferenceEngine:
    config = dict(
        device="cpu", max_requests=6, max_tokens=24, block_size_tokens=8, kv_cache_blocks=24,
        max_sequence_length=128, num_speculative_tokens=spec,
    )  # fmt: skip
    return DynamicInferenceEngine(model, InferenceConfig(**{**config, **overrides}))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    ruled = [rule_batch(1, n, g)[0, :n].tolist() for n in (6, 30, 11, 45)]
    random = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 37)]
    return ruled + random


def test_speculative_greedy_equals_plain_greedy(trained) -> None:
    kind, model = trained
    prompts = _prompts()
    params = SamplingParams(max_tokens=40, temperature=0)
    plain = _engine(model, 0)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    for spec in (1, 2):
        engine = _engine(model, spec)
        got = [o.token_ids for o in engine.generate(prompts, params)]
        assert got == want, (kind, spec)
        stats = engine.stats()
        assert stats.preemptions > 0  # 23 blocks of 8 do not hold 6 requests of up to 85 tokens
        assert stats.spec_drafted_per_position[spec - 1] > 0
        # The drafts are often right, and sometimes wrong.
        assert 0.3 < stats.spec_acceptance_rate < 1.0, (kind, spec, stats.spec_acceptance_rate)
        assert stats.spec_tokens_per_verify_step > 1.3
        # Fewer forwards than tokens: the point of speculating.
        assert stats.steps < plain.stats().steps


def test_a_request_can_turn_speculation_off_or_draft_fewer(trained) -> None:
    _kind, model = trained
    prompts = _prompts()[:3]
    engine = _engine(model, 2)
    params = [
        SamplingParams(max_tokens=20, temperature=0, num_speculative_tokens=n) for n in (0, 1, None)
    ]
    got = [o.token_ids for o in engine.generate(prompts, params)]
    plain = _engine(model, 0).generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    assert got == [o.token_ids for o in plain]
    # Alone, each setting drafts what it says: none, one per step, the engine's two.
    drafted = []
    for n in (0, 1, None):
        alone = _engine(model, 2)
        alone.generate(
            prompts, SamplingParams(max_tokens=20, temperature=0, num_speculative_tokens=n)
        )
        drafted.append(alone.stats().spec_drafted_per_position)
    assert drafted[0] == [0, 0]
    assert drafted[1][0] > 0 and drafted[1][1] == 0
    assert drafted[2][0] > 0 and drafted[2][1] > 0
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens is 3") as error:
        engine.add_request([1, 2, 3], SamplingParams(num_speculative_tokens=3))
    assert error.value.field == "num_speculative_tokens"


def _sampled(model: GPTModel, spec: int, n: int, prompt: list[int]) -> list[list[int]]:
    """``n`` sampled continuations; the seeds differ between ``spec`` values, so the two
    samples are independent."""
    engine = _engine(model, spec, max_requests=64, max_tokens=512, kv_cache_blocks=300)
    params = [
        SamplingParams(max_tokens=4, temperature=1.0, seed=spec * n + i, ignore_eos=True)
        for i in range(n)
    ]
    outputs = [out.token_ids for out in engine.generate([prompt] * n, params)]
    if spec:
        stats = engine.stats()
        assert stats.spec_draft_tokens > 0
        assert 0.0 < stats.spec_acceptance_rate < 1.0
    return outputs


def _homogeneity_p(spec: list, plain: list) -> tuple[float, int]:
    """p-value of a chi-squared homogeneity test of two equal-sized samples, outcomes seen
    fewer than 20 times in both together pooled into one cell; and the number of cells."""
    counts: dict = {}
    for i, sample in enumerate((spec, plain)):
        for key in sample:
            counts.setdefault(key, [0, 0])[i] += 1
    cells, rest = [], [0, 0]
    for a, b in counts.values():
        if a + b >= 20:
            cells.append((a, b))
        else:
            rest[0] += a
            rest[1] += b
    cells.append(tuple(rest))
    chi2 = sum((a - b) ** 2 / (a + b) for a, b in cells if a + b)
    return _chi2_sf(chi2, max(len(cells) - 1, 1)), len(cells)


def test_speculative_sampling_keeps_the_model_distribution() -> None:
    """Three sampled tokens after a prompt of the rule, 1,500 times each way. The second and
    third come out of verification (the first is the prefill's); the counts of each, and of
    the pair, pass a chi-squared homogeneity test against plain sampling (p > 0.001)."""
    # Less sure of itself (several likely tokens), and MTP depths that never trained: their
    # drafts are often rejected, so what is drawn on rejection matters.
    model = train_model("dense", steps=40, mtp_factor=0.0)
    prompt = rule_batch(1, 8, torch.Generator().manual_seed(5))[0, :8].tolist()
    n = 1500
    spec, plain = _sampled(model, 2, n, prompt), _sampled(model, 0, n, prompt)
    for name, pick in (("second", lambda t: t[1]), ("third", lambda t: t[2]),
                       ("pair", lambda t: (t[1], t[2]))):  # fmt: skip
        p, cells = _homogeneity_p([pick(t) for t in spec], [pick(t) for t in plain])
        assert cells >= 5, (name, cells)  # a distribution worth testing
        assert p > 1e-3, (name, p)


def _chi2_sf(x: float, k: int) -> float:
    """Survival function of the chi-squared distribution (Wilson-Hilferty approximation)."""
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_bad_speculation_settings_name_the_knob() -> None:
    model = GPTModel(_config(mtp_num_layers=1, mtp_loss_scaling_factor=None))
    with pytest.raises(InvalidRequestError, match="has 1 multi-token-prediction depth") as e:
        _engine(model, 2)
    assert e.value.field == "num_speculative_tokens"
    no_mtp = GPTModel(_config(mtp_num_layers=0, mtp_loss_scaling_factor=None))
    with pytest.raises(InvalidRequestError, match="no multi-token-prediction layers"):
        _engine(no_mtp, 1)
    plain = _engine(no_mtp, 0)
    with pytest.raises(InvalidRequestError, match="drafts at most 0"):
        plain.add_request([1, 2], SamplingParams(num_speculative_tokens=1))


# -- the trained example, served ------------------------------------------------------------


KINDS = {
    "dense": {},
    "moe": {"moe.num-experts": "4", "moe.router-topk": "2", "moe.ffn-hidden-size": "64"},
    "hybrid": {
        "model.num-layers": "3", "model.hybrid-override-pattern": "M*-/*-/*-",
        "ssm.mamba-head-dim": "16", "ssm.mamba-num-groups": "2", "ssm.mamba-state-dim": "8",
        "ssm.mamba-chunk-size": "16",
    },
}  # fmt: skip


@pytest.fixture(scope="module", params=list(KINDS))
def mtp_checkpoint(request, tmp_path_factory) -> str:
    """``mcore train`` with two MTP depths on the built-in corpus, saved (one process): a
    dense, an MoE and a hybrid (Mamba-2) model."""
    from mcore.core import load_config
    from mcore.core.training.loop import train

    folder = tmp_path_factory.mktemp(f"mtp-run-{request.param}")
    overrides = {
        "model.num-layers": "2", "model.hidden-size": "64", "model.num-attention-heads": "4",
        "model.mtp-num-layers": "2", "model.mtp-loss-scaling-factor": "0.5",
        "train.train-iters": "40", "train.seq-length": "64", "train.micro-batch-size": "8",
        "optimizer.lr": "3e-3", "data.max-bytes": "200000",
        "data.cache-dir": str(folder / "data"), "checkpoint.save": str(folder / "ckpt"),
        "logger.log-interval": "1000", **KINDS[request.param],
    }  # fmt: skip
    losses = train(load_config(overrides=overrides)).losses
    assert losses[-1] < losses[0] - 1.0
    return str(folder / "ckpt")


def test_mcore_serve_with_speculation_equals_plain_greedy(mtp_checkpoint) -> None:
    """The checkpoint served by ``mcore serve --inference.num-speculative-tokens 2``, with
    chunked prefill (16-token steps) and a KV cache small enough to preempt: 8 concurrent
    greedy completions equal the plain engine's, and /metrics reports the drafts."""
    import json
    import sys
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from mcore.core.testing import served
    from mcore.inference import load_model

    model, tokenizer = load_model(mtp_checkpoint)
    assert model.mtp is not None and model.mtp.depth == 2
    g = torch.Generator().manual_seed(9)
    vocab = tokenizer.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 40, 12, 33) * 2]
    plain = DynamicInferenceEngine(
        model, InferenceConfig(device="cpu", kv_cache_blocks=64, block_size_tokens=8),
        tokenizer=tokenizer,
    )  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, params)]

    command = [
        str(Path(sys.executable).parent / "mcore"), "serve", "--model", mtp_checkpoint,
        "--inference.device", "cpu", "--inference.num-speculative-tokens", "2",
        "--inference.max-tokens", "16", "--inference.max-requests", "8",
        "--inference.kv-cache-blocks", "16", "--inference.block-size-tokens", "8",
    ]  # fmt: skip

    def post(url: str, body: dict):
        request = urllib.request.Request(
            url + "/v1/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        return urllib.request.urlopen(request, timeout=120)

    def complete(url: str, prompt: list[int]) -> list[int]:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        with post(url, body) as response:
            return json.load(response)["choices"][0]["token_ids"]

    with served(command) as url:
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: complete(url, p), prompts))
        assert got == want
        # A per-request setting above the engine's is refused by name; the server keeps going.
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(url, {"prompt": prompts[0], "max_tokens": 2, "num_speculative_tokens": 5})
        assert refused.value.code == 400
        assert json.load(refused.value)["error"]["param"] == "num_speculative_tokens"
        with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
            metrics = response.read().decode()
        values = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line and not line.startswith("#")
        }
        assert values["mcore_spec_decode_draft_tokens_total"] > 0
        assert values['mcore_spec_decode_accepted_tokens_per_position_total{position="2"}'] >= 0
        assert 0 < values["mcore_spec_acceptance_rate"] <= 1
        assert values["mcore_preemptions_total"] > 0
        assert complete(url, prompts[1]) == want[1]  # still serving
