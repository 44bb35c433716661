"""``mcore serve`` of imported hybrid models generates what transformers' ``generate`` does.

Nemotron-H and Qwen3-Next saved by transformers (:mod:`mcore.ssm.testing`) are served by the
``mcore serve`` command over real HTTP; 16 requests arrive at once, with a step budget of 24
tokens so that long prompts are prefilled in chunks beside other requests' decode steps. Every
greedy completion equals transformers' greedy decoding of the same prompt alone.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("mcore.moe")

from mcore.core.testing import served
from mcore.ssm.testing import make_hf

BIN = Path(sys.executable).parent
NEW_TOKENS = 8
LENGTHS = (3, 40, 17, 1, 29, 9, 55, 26, 5, 33, 12, 2, 47, 20, 8, 14)


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation with no end-of-sequence token (as ``ignore_eos``: the
    end token may be chosen and does not stop; ``min_new_tokens`` would instead forbid it)."""
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def complete(url: str, prompt: list[int]) -> list[int]:
    body = {"model": "hybrid", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        (choice,) = json.load(response)["choices"]
    assert choice["prompt_token_ids"] == prompt
    return choice["token_ids"]


@pytest.mark.parametrize("case", ["nemotron_h", "qwen3_next"])
def test_mcore_serve_greedy_equals_transformers_generate(case, tmp_path) -> None:
    hf = make_hf(case, tmp_path / case)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in LENGTHS]
    command = [
        str(BIN / "mcore"), "serve", "--model", str(tmp_path / case),
        "--served-model-name", "hybrid", "--inference.device", "cpu",
        "--inference.max-tokens", "24", "--inference.max-requests", "16",
        "--inference.kv-cache-blocks", "64", "--inference.block-size-tokens", "8",
    ]  # fmt: skip
    with served(command) as url, ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(lambda p: complete(url, p), prompts))
    for prompt, tokens in zip(prompts, outputs, strict=True):
        assert tokens == hf_greedy(hf, prompt), f"prompt of {len(prompt)} tokens"
