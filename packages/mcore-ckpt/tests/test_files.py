"""Checkpoint files one can trust: atomic publishing, and clear errors for every kind of damage.

Single-process checkpoints of a few global tensors, written by ``write_checkpoint`` (the path
every save takes) and then damaged the ways a real checkpoint gets damaged.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from mcore.ckpt import dcp_io, directory
from mcore.ckpt.checkpointer import read_common, write_checkpoint
from mcore.ckpt.errors import CheckpointingException
from mcore.parallel.sharding import ShardedTensor


def _tensors(seed: int = 0) -> dict[str, ShardedTensor | torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    # Two pieces of one global tensor, as two ranks (or a fused layout) would hold it.
    return {
        "model.w": ShardedTensor("model.w", (8, 4), w.dtype, [(w[:3], (0, 0)), (w[3:], (3, 0))]),
        "model.b": ShardedTensor("model.b", (4,), w.dtype, [(torch.randn(4, generator=g), (0,))]),
        "optimizer.state.w.step": torch.tensor(7.0),
    }


def _save(root: Path, iteration: int, seed: int = 0, **kw) -> Path:
    tensors = _tensors(seed)
    path = write_checkpoint(
        root,
        iteration,
        lambda folder: dcp_io.write(folder, tensors, group=None),
        {"format": "torch_dist", "iteration": iteration},
        group=None,
        **kw,
    )
    return Path(path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    folder = directory.resolve(path)
    common = read_common(folder)
    metadata = dcp_io.read_metadata(folder)
    dcp_io.check_files(folder, metadata, common.get("files"))
    # Read back with another cut: columns instead of rows.
    w = torch.zeros(8, 4)
    target = {
        "model.w": ShardedTensor(
            "model.w", (8, 4), w.dtype, [(w[:, :1], (0, 0)), (w[:, 1:], (0, 1))]
        ),
        "model.b": ShardedTensor("model.b", (4,), w.dtype, [(torch.zeros(4), (0,))]),
        "optimizer.state.w.step": torch.tensor(0.0),
    }
    dcp_io.read(folder, target, group=None, metadata=metadata)
    return {"w": w, "b": target["model.b"].pieces[0][0], "step": target["optimizer.state.w.step"]}


def test_a_checkpoint_loads_back_under_another_cut_of_its_tensors(tmp_path: Path) -> None:
    path = _save(tmp_path, 10)
    assert path == tmp_path / "iter_0000010"
    assert (tmp_path / "latest").read_text().strip() == "iter_0000010"
    common = read_common(path)
    assert set(common["files"]) == {"__0_0.distcp"}  # size and CRC-32 of every data file
    loaded = _load(tmp_path)
    expected = _tensors()
    w = torch.cat([expected["model.w"].pieces[0][0], expected["model.w"].pieces[1][0]])
    torch.testing.assert_close(loaded["w"], w)
    torch.testing.assert_close(loaded["b"], expected["model.b"].pieces[0][0])
    assert loaded["step"].item() == 7.0


def test_latest_moves_only_when_a_save_is_complete_and_old_ones_are_pruned(tmp_path) -> None:
    for it in (1, 2, 3):
        _save(tmp_path, it, seed=it, keep_last=2)
    assert [p.name for _, p in directory.published(tmp_path)] == ["iter_0000002", "iter_0000003"]
    # A save that fails while writing publishes nothing and leaves no temporary folder.

    def fail(folder: Path) -> dict:
        (folder / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 4, fail, {"format": "torch_dist", "iteration": 4}, group=None)
    assert directory.latest(tmp_path) == tmp_path / "iter_0000003"
    assert not directory.tmp_dir(tmp_path, 4).exists()
    # A crashed save's folder is swept before the next one.
    directory.tmp_dir(tmp_path, 5).mkdir()
    directory.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]


def test_a_missing_shard_file_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointingException, match="missing its shard file '__0_0.distcp'"):
        _load(tmp_path)


def test_a_truncated_shard_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    data = (path / "__0_0.distcp").read_bytes()
    (path / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointingException, match="__0_0.distcp' is truncated"):
        _load(tmp_path)


def test_a_corrupted_shard_fails_its_checksum(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    (path / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointingException, match="is corrupt: its CRC-32 does not match"):
        _load(tmp_path)


def test_damaged_metadata_and_records_are_reported(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointingException, match="metadata .* is corrupt"):
        _load(tmp_path)
    path = _save(tmp_path, 2)
    (path / "common.json").write_text("{not json")
    with pytest.raises(CheckpointingException, match="common.json' is corrupt"):
        _load(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointingException, match="latest' is damaged"):
        _load(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_is_never_unpickled_as_arbitrary_objects(tmp_path: Path, monkeypatch) -> None:
    path = _save(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointingException, match="posix.system, which is not part of DCP"):
        _load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_a_model_of_another_shape_is_told_what_differs(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    metadata = dcp_io.read_metadata(path)
    wrong = {
        "model.w": ShardedTensor("model.w", (8, 6), torch.float32, [(torch.zeros(8, 6), (0, 0))])
    }
    with pytest.raises(
        CheckpointingException, match=r"model.w: checkpoint \(8, 4\), this model \(8, 6\)"
    ):
        dcp_io.read(path, wrong, group=None, metadata=metadata)
    absent = {"model.extra": torch.zeros(2)}
    with pytest.raises(CheckpointingException, match="lacks 1 tensor.*model.extra"):
        dcp_io.read(path, absent, group=None, metadata=metadata)


def test_a_folder_that_is_no_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointingException, match="does not exist"):
        directory.resolve(tmp_path / "nothing")
    with pytest.raises(CheckpointingException, match="holds no complete checkpoint"):
        directory.resolve(tmp_path)
    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / "iter_0000001" / "common.json").write_text(json.dumps({"iteration": 1}))
    with pytest.raises(CheckpointingException, match="no .metadata file"):
        dcp_io.read_metadata(tmp_path / "iter_0000001")
