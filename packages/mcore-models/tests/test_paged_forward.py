"""``GPTModel.forward_paged`` over a paged KV cache gives the logits of the plain forward.

A small hand-made allocator stands in for the inference engine: three sequences are run in
steps that mix prefill chunks (one chunked over two steps) with decode tokens, their keys and
values written to scattered cache blocks, and each step's logits are compared with the plain
forward over the whole sequence so far.
"""

from __future__ import annotations

import pytest
import torch

from mcore.models import GPTModel
from mcore.models.inference import PagedBatch, prepare_for_inference

BLOCK = 4
WIDTH = 8  # blocks per sequence


class PagedRun:
    """Drives ``forward_paged`` step by step for a few sequences."""

    def __init__(self, model: GPTModel, sequences: list[list[int]]) -> None:
        self.model = model
        self.sequences = sequences
        # Interleaved block ids, so every sequence's context is scattered over the cache.
        self.tables = [
            [1 + i + len(sequences) * j for j in range(WIDTH)] for i in range(len(sequences))
        ]
        blocks = 1 + len(sequences) * WIDTH
        self.caches = {
            layer: tuple(torch.zeros(shape) for shape in spec.shapes(blocks, BLOCK))
            for layer, spec in model.kv_cache_specs().items()
        }
        self.computed = [0] * len(sequences)

    def slot(self, i: int, position: int) -> int:
        return self.tables[i][position // BLOCK] * BLOCK + position % BLOCK

    def step(self, chunks: list[tuple[int, int]], decode_runs=()) -> torch.Tensor:
        """Compute ``n`` more tokens of sequence ``i`` for each ``(i, n)``; logits of the last
        token of each chunk, in ``chunks`` order. ``decode_runs`` as ``PagedBatch`` takes it."""
        decode = [(i, n) for i, n in chunks if n == 1]
        prefill = [(i, n) for i, n in chunks if n > 1]
        ids, positions, slots, rows = [], [], [], {}
        for i, n in decode + prefill:
            start = self.computed[i]
            rows[i] = list(range(len(ids), len(ids) + n))
            for p in range(start, start + n):
                ids.append(self.sequences[i][p])
                positions.append(p)
                slots.append(self.slot(i, p))
        total = len(ids)
        longest = max((n for _, n in prefill), default=0)

        def t(values, *shape):
            return torch.tensor(values, dtype=torch.long).view(*shape)

        batch = PagedBatch(
            input_ids=t(ids, -1),
            positions=t(positions, -1),
            slot_mapping=t(slots, -1),
            block_size=BLOCK,
            num_decode=len(decode),
            decode_block_tables=t([self.tables[i] for i, _ in decode], len(decode), WIDTH),
            decode_context_lens=t([self.computed[i] + 1 for i, _ in decode], -1),
            num_prefill=len(prefill),
            prefill_block_tables=t([self.tables[i] for i, _ in prefill], len(prefill), WIDTH),
            prefill_query_rows=t(
                [rows[i] + [total] * (longest - n) for i, n in prefill], len(prefill), longest
            ),
            prefill_query_positions=t(
                [
                    list(range(self.computed[i], self.computed[i] + n)) + [0] * (longest - n)
                    for i, n in prefill
                ],
                len(prefill),
                longest,
            ),
            logits_rows=t([rows[i][-1] for i, _ in chunks], -1),
            decode_runs=decode_runs,
            caches=self.caches,
        )
        with torch.no_grad():
            logits = self.model.forward_paged(batch)
        for i, n in chunks:
            self.computed[i] += n
        return logits


MLA = dict(
    multi_latent_attention=True,
    num_query_groups=None,
    q_lora_rank=12,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=8,
    v_head_dim=8,
)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_paged_steps_match_the_plain_forward(tiny, attention) -> None:
    torch.manual_seed(0)
    config = tiny(**(MLA if attention == "mla" else {}))
    model = prepare_for_inference(GPTModel(config))
    g = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (9, 5, 14)
    ]
    run = PagedRun(model, sequences)
    # Step 1: two whole prompts but the last token of one, and the first chunk of the third.
    run.step([(0, 9), (1, 4), (2, 6)])
    # Step 2: a decode-like single token, the rest of the chunked prompt.
    logits = run.step([(1, 1), (2, 8)])
    with torch.no_grad():
        expected = [model(torch.tensor([sequences[i]]))[0, -1] for i in (1, 2)]
    torch.testing.assert_close(logits, torch.stack(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_decode_runs_each_over_their_own_blocks_match_the_plain_forward(tiny, attention) -> None:
    torch.manual_seed(0)
    config = tiny(**(MLA if attention == "mla" else {}))
    model = prepare_for_inference(GPTModel(config))
    g = torch.Generator().manual_seed(2)
    lengths = (4, 29, 11, 22)  # their last tokens need 1, 8, 3 and 6 blocks
    sequences = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    run = PagedRun(model, sequences)
    run.step([(i, n - 1) for i, n in enumerate(lengths)])
    # The long two over all 8 blocks, the short two (rows out of order) over their first 3.
    runs = ((torch.tensor([1, 3]), WIDTH), (torch.tensor([2, 0]), 3))
    logits = run.step([(i, 1) for i in range(len(lengths))], decode_runs=runs)
    with torch.no_grad():
        expected = [model(torch.tensor([seq]))[0, -1] for seq in sequences]
    torch.testing.assert_close(logits, torch.stack(expected), rtol=0, atol=1e-5)


def test_mla_caches_the_latent_not_per_head_keys_and_values(tiny) -> None:
    gqa = GPTModel(tiny()).kv_cache_specs()[0]
    mla = GPTModel(tiny(**MLA)).kv_cache_specs()[0]
    assert (gqa.heads, gqa.num_tensors) == (2, 2)
    assert (mla.heads, mla.key_dim, mla.value_dim, mla.num_tensors) == (1, 16 + 8, 16, 1)
    per_head_kv = tiny(**MLA).num_attention_heads * (8 + 8 + 8)
    assert mla.elements_per_token() < per_head_kv
