"""mcore.core.data: tokenizers, Megatron's indexed datasets, GPT sampling, blending and FIM.

The pieces, bottom up::

    tokenizer.py  Tokenizer protocol; ByteTokenizer (built in), HFTokenizer (tokenizer.json)
    indexed.py    IndexedDatasetBuilder / IndexedDataset: Megatron-LM's .bin + .idx format
    prepare.py    text and JSONL files -> indexed dataset: prepare(), `mcore data prepare`
    cache.py      .npy index caches keyed by a hash of their inputs
    gpt.py        GPTDataset: seq_length + 1 token samples across documents, split ranges
    blended.py    BlendedDataset: weighted mix of datasets, parse_data_path
    fim.py        FIMDataset: fill-in-the-middle (PSM / SPM) keeping the sample length
    corpus.py     registry entries: datasets `python_stdlib` and `indexed`

Registry contracts (both take the run ``Config`` or its ``DataConfig``)::

    tokenizer entries:  build(config) -> Tokenizer
    dataset entries:    build(config, tokenizer, *, num_samples: dict) -> (train, valid, test)

In a training driver::

    from mcore.core.data import build_datasets, build_tokenizer

    tokenizer = build_tokenizer(config)
    train, valid, test = build_datasets(
        config, tokenizer, num_samples={"train": iters * gbs, "valid": n_eval, "test": 0}
    )
    batch = torch.utils.data.default_collate([train[i] for i in range(4)])
    # batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]: [4, seq]

Names below resolve on first use (PEP 562): importing this package, as the plugin loader does
for ``mcore data``, imports neither numpy nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcore.core.lazy import lazy_exports

_EXPORTS = {
    "AmbiguousPadTokenWarning": "mcore.core.data.tokenizer",
    "BlendedDataset": "mcore.core.data.blended",
    "ByteTokenizer": "mcore.core.data.tokenizer",
    "DatasetFormatError": "mcore.core.data.indexed",
    "FIMDataset": "mcore.core.data.fim",
    "FIMTokens": "mcore.core.data.fim",
    "GPTDataOptions": "mcore.core.data.corpus",
    "GPTDataset": "mcore.core.data.gpt",
    "HFTokenizer": "mcore.core.data.tokenizer",
    "IndexedDataset": "mcore.core.data.indexed",
    "IndexedDatasetBuilder": "mcore.core.data.indexed",
    "Tokenizer": "mcore.core.data.tokenizer",
    "build_datasets": "mcore.core.data.corpus",
    "build_gpt_datasets": "mcore.core.data.corpus",
    "build_tokenizer": "mcore.core.data.tokenizer",
    "parse_data_path": "mcore.core.data.blended",
    "split_ranges": "mcore.core.data.gpt",
    "stdlib_sources": "mcore.core.data.corpus",
    "train_bpe": "mcore.core.data.tokenizer",
}

__all__ = [
    "AmbiguousPadTokenWarning",
    "BlendedDataset",
    "ByteTokenizer",
    "DatasetFormatError",
    "FIMDataset",
    "FIMTokens",
    "GPTDataOptions",
    "GPTDataset",
    "HFTokenizer",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "Tokenizer",
    "build_datasets",
    "build_gpt_datasets",
    "build_tokenizer",
    "parse_data_path",
    "split_ranges",
    "stdlib_sources",
    "train_bpe",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mcore.core.data.blended import BlendedDataset, parse_data_path
    from mcore.core.data.corpus import (
        GPTDataOptions,
        build_datasets,
        build_gpt_datasets,
        stdlib_sources,
    )
    from mcore.core.data.fim import FIMDataset, FIMTokens
    from mcore.core.data.gpt import GPTDataset, split_ranges
    from mcore.core.data.indexed import DatasetFormatError, IndexedDataset, IndexedDatasetBuilder
    from mcore.core.data.tokenizer import (
        AmbiguousPadTokenWarning,
        ByteTokenizer,
        HFTokenizer,
        Tokenizer,
        build_tokenizer,
        train_bpe,
    )
