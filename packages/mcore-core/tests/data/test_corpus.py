"""The dataset registry entries as a training driver calls them: the built-in standard-library
corpus and Megatron indexed datasets named in data.data_path, blended by weight."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mcore.core import Config, McoreError, get_registry, load_config
from mcore.core.data import (
    BlendedDataset,
    ByteTokenizer,
    DatasetFormatError,
    FIMDataset,
    GPTDataset,
    build_datasets,
    build_tokenizer,
    stdlib_sources,
)
from mcore.core.data.prepare import write_documents
from mcore.core.sections import DataConfig, TrainConfig


def test_stdlib_sources_are_sorted_source_files_without_tests() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(max_bytes=2_000_000)

    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative)
    assert all(name.endswith(".py") for name in relative)
    assert not any({"test", "tests", "site-packages"} & set(name.split("/")) for name in relative)
    assert sum(p.stat().st_size for p in files) <= 2_000_000
    assert len(files) > 20


STDLIB_BYTES = 300_000


def stdlib_config(tmp_path: Path, **extra) -> Config:
    data = DataConfig(cache_dir=str(tmp_path / "cache"), split="8,1,1", max_bytes=STDLIB_BYTES)
    for name, value in extra.items():
        setattr(data, name, value)
    return Config({"data": data, "train": TrainConfig(seq_length=64)})


def test_python_stdlib_is_the_default_and_builds_once(tmp_path: Path) -> None:
    config = stdlib_config(tmp_path)
    tokenizer = build_tokenizer(config)

    train, valid, test = build_datasets(
        config, tokenizer, num_samples={"train": 300, "valid": 20, "test": 10}
    )
    again, _, _ = build_datasets(config, tokenizer, num_samples={"train": 300, "valid": 20})

    assert config.data.dataset == "python_stdlib"
    assert [type(d) for d in (train, valid, test)] == [GPTDataset] * 3
    assert len(train) >= 300 and len(valid) >= 20 and len(test) >= 10
    assert set(train[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert again.from_cache and not train.from_cache
    assert len(list((tmp_path / "cache").glob("python_stdlib-*.bin"))) == 1
    assert any((tmp_path / "cache" / "GPTDataset_indices").glob("*train-sample_index.npy"))
    text = tokenizer.decode(train[0]["tokens"].tolist())
    assert text.isprintable() or "\n" in text


def test_run_config_seed_and_zero_samples(tmp_path: Path) -> None:
    overrides = {"data.cache_dir": str(tmp_path), "train.seq_length": "32", "train.seed": "7"}
    config = load_config(None, overrides)
    config.data.max_bytes = STDLIB_BYTES

    train, valid, test = build_datasets(
        config, ByteTokenizer(), num_samples={"train": 50, "valid": 0, "test": 0}
    )

    assert train.seed == 7 and valid is None and test is None


def test_fim_from_the_data_config(tmp_path: Path) -> None:
    config = stdlib_config(tmp_path, fim_rate=0.5, fim_split_token="\n")

    train, _, _ = build_datasets(config, ByteTokenizer(), num_samples={"train": 20})

    assert isinstance(train, FIMDataset) and train.split_token == ord("\n")
    assert train[0]["tokens"].shape == (64,)


@pytest.fixture
def two_prefixes(tmp_path: Path, stdlib_files: list[Path]) -> list[str]:
    tok = ByteTokenizer()
    half = len(stdlib_files) // 2
    prefixes = []
    for name, files in (("first", stdlib_files[:half]), ("second", stdlib_files[half:])):
        texts = (p.read_text(encoding="utf-8") for p in files)
        prefixes.append(str(write_documents(texts, tok, tmp_path / name, append_eod=True).prefix))
    return prefixes


def test_indexed_blends_data_path_by_weight(tmp_path: Path, two_prefixes: list[str]) -> None:
    data = DataConfig(
        dataset="indexed",
        data_path=["0.7", two_prefixes[0], "0.3", two_prefixes[1]],
        split="8,1,1",
    )
    config = Config({"data": data, "train": TrainConfig(seq_length=64)})

    train, valid, _ = build_datasets(
        config, ByteTokenizer(), num_samples={"train": 500, "valid": 40, "test": 0}
    )

    assert isinstance(train, BlendedDataset) and len(train) == 500
    shares = np.bincount(train.dataset_index, minlength=2) / 500
    assert shares.tolist() == pytest.approx([0.7, 0.3], abs=0.005)
    assert isinstance(valid, BlendedDataset) and len(valid) == 40
    assert train[0]["tokens"].shape == (64,)


def test_indexed_single_prefix_and_errors(tmp_path: Path, two_prefixes: list[str]) -> None:
    build = get_registry("dataset").get("indexed")
    single = DataConfig(dataset="indexed", data_path=[two_prefixes[0]])

    train, _, _ = build(single, ByteTokenizer(), num_samples={"train": 30})

    assert isinstance(train, GPTDataset)
    with pytest.raises(McoreError, match="needs data.data_path"):
        build(DataConfig(dataset="indexed"), ByteTokenizer(), num_samples={})
    with pytest.raises(DatasetFormatError, match="mcore data prepare"):
        missing = DataConfig(dataset="indexed", data_path=[str(tmp_path / "nope")])
        build(missing, ByteTokenizer(), num_samples={})
