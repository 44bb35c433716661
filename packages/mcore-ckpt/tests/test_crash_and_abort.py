"""A save cut short, by SIGKILL or by abort, never costs the last good checkpoint.

The kill is real: a child process saves step 1, then starts writing a large step 2, and is
killed with SIGKILL while its shard file is still growing. ``latest`` must still name step 1,
which must load with its exact values; the next save sweeps the half-written folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

from mcore.ckpt import dcp_io, directory
from mcore.ckpt.checkpointer import read_common, write_checkpoint
from mcore.parallel.sharding import ShardedTensor

CHILD = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from mcore.ckpt import dcp_io
    from mcore.ckpt.checkpointer import write_checkpoint
    from mcore.parallel.sharding import ShardedTensor

    root = Path(sys.argv[1])

    def save(iteration, tensor):
        st = {"model.w": ShardedTensor("model.w", tuple(tensor.shape), tensor.dtype,
                                       [(tensor, (0,) * tensor.dim())])}
        write_checkpoint(root, iteration, lambda f: dcp_io.write(f, st, group=None),
                         {"format": "torch_dist", "iteration": iteration}, group=None)

    save(1, torch.arange(1000, dtype=torch.float32))
    print("saved 1", flush=True)
    save(2, torch.ones(160 * 2**20 // 4, 8))  # 1.25 GiB: seconds to write
    print("saved 2", flush=True)
    """
)


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "saved 1"
    shard = directory.tmp_dir(root, 2) / "__0_0.distcp"
    deadline = time.monotonic() + 120
    while not (shard.exists() and shard.stat().st_size > 0):
        assert child.poll() is None and time.monotonic() < deadline, "the second save never began"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    written = shard.stat().st_size
    assert written < 160 * 2**20 * 8, "the save finished before the kill; nothing was tested"

    # latest still names step 1, complete, and it loads with its exact values.
    assert (root / "latest").read_text().strip() == "iter_0000001"
    path = directory.resolve(root)
    assert path.name == "iter_0000001"
    common = read_common(path)
    metadata = dcp_io.read_metadata(path)
    dcp_io.check_files(path, metadata, common["files"])
    w = torch.zeros(1000)
    dcp_io.read(path, {"model.w": ShardedTensor("model.w", (1000,), w.dtype, [(w, (0,))])},
                group=None, metadata=metadata)  # fmt: skip
    torch.testing.assert_close(w, torch.arange(1000, dtype=torch.float32))

    # The next save (of a new run resuming here) sweeps the half-written folder.
    directory.clean_stale(root)
    assert not directory.tmp_dir(root, 2).exists()


def test_an_aborted_save_publishes_nothing_and_the_next_one_works(tmp_path: Path) -> None:
    root = tmp_path / "run"

    def save(iteration: int, tensor: torch.Tensor, abort: threading.Event | None = None) -> str:
        st = {"model.w": ShardedTensor("model.w", tuple(tensor.shape), tensor.dtype,
                                       [(tensor, (0,) * tensor.dim())])}  # fmt: skip
        return write_checkpoint(
            root,
            iteration,
            lambda f: dcp_io.write(f, st, group=None, abort=abort),
            {"format": "torch_dist", "iteration": iteration},
            group=None,
        )

    save(1, torch.zeros(10))
    abort = threading.Event()
    abort.set()
    try:
        save(2, torch.ones(10), abort)
    except Exception as exc:
        assert "aborted" in str(exc)
    else:
        raise AssertionError("an aborted save must fail")
    assert (root / "latest").read_text().strip() == "iter_0000001"
    assert not directory.tmp_dir(root, 2).exists()
    assert save(3, torch.ones(10)).endswith("iter_0000003")
    assert (root / "latest").read_text().strip() == "iter_0000003"
