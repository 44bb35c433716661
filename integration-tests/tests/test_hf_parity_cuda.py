"""The Hugging Face parity on a CUDA device: NCCL process groups, bf16, Transformer Engine.

These run where a GPU is present (marker ``gpu``) and skip elsewhere.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mcore.core.testing import run_ranks  # noqa: E402
from mcore.models.hf import load_hf  # noqa: E402
from mcore.parallel import ParallelState  # noqa: E402

pytestmark = pytest.mark.gpu

CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-cuda")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(folder)
    return folder


def _ids():
    return torch.randint(
        0, CONFIG["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(1)
    )


def _hf_logits(folder, dtype):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).cuda().eval()
    with torch.no_grad():
        return hf(input_ids=_ids().cuda()).logits.float().cpu()


def _ours(rank, world, folder, dtype, backend_name):
    ps = ParallelState(device_type="cuda")
    model = load_hf(folder, ps, config_overrides={"attention_backend": backend_name})
    model = model.to("cuda", dtype).eval()
    with torch.no_grad():
        return model(_ids().cuda()).float().cpu()


def _close_in_bf16(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # bf16 keeps ~3 significant digits; compare the distributions of both models' logits.
    diff = (ours - theirs).abs()
    assert diff.mean().item() < 2e-2, diff.mean().item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.95


def test_fp32_on_cuda_with_nccl_matches_transformers(hf_dir) -> None:
    theirs = _hf_logits(hf_dir, torch.float32)
    [ours] = run_ranks(_ours, 1, hf_dir, torch.float32, "sdpa", backend="nccl")
    assert (ours - theirs).abs().max().item() < 1e-3  # TF32 matmuls may be on


def test_bf16_on_cuda_matches_transformers(hf_dir) -> None:
    theirs = _hf_logits(hf_dir, torch.bfloat16)
    [ours] = run_ranks(_ours, 1, hf_dir, torch.bfloat16, "sdpa", backend="nccl")
    _close_in_bf16(ours, theirs)


def test_transformer_engine_backend_matches_sdpa(hf_dir) -> None:
    pytest.importorskip("transformer_engine.pytorch")
    [sdpa] = run_ranks(_ours, 1, hf_dir, torch.bfloat16, "sdpa", backend="nccl")
    [te] = run_ranks(_ours, 1, hf_dir, torch.bfloat16, "te", backend="nccl")
    _close_in_bf16(te, sdpa)
