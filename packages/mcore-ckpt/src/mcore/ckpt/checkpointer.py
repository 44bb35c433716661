"""What ``mcore train`` saves and resumes with (the ``mcore_checkpointer`` hook's object).

A save is the training state (see :mod:`mcore.ckpt.state`) in the configured format plus
``common.json``, rank 0's small JSON record of everything that is not a tensor:

``{"format", "version", "iteration", "consumed_samples", "scheduler", "loss_scaler",
"layout" (world size and every parallel size of the run that saved), "model" (the model
config, vocabulary padded), "config" (the whole run config), "files" (every data file with its
size and CRC-32)}``.

Saves are published atomically (see :mod:`mcore.ckpt.directory`). With
``checkpoint.async_save`` the training thread only snapshots the state to CPU memory; one
persistent background thread per rank writes and publishes it, talking to the other ranks
over a process group of its own, while training goes on. At most one save is in flight: the
next waits for it. :meth:`Checkpointer.abort` stops a save in flight between files and
publishes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch.distributed as dist

from mcore.ckpt import directory, state
from mcore.ckpt.errors import CheckpointingException
from mcore.ckpt.formats import get_format
from mcore.parallel.sharding import unwrap

if TYPE_CHECKING:
    from mcore.core.protocols import TrainingRuntime

VERSION = 1


class _Worker:
    """One background thread running jobs in order; a job's exception is kept for the caller."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], _Result] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mcore-ckpt-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, result = item
            try:
                result.value = job()
            except BaseException as exc:  # reported on the training thread
                result.error = exc
            finally:
                result.done.set()

    def submit(self, job: Callable[[], Any]) -> _Result:
        result = _Result()
        self._jobs.put((job, result))
        return result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)


@dataclasses.dataclass
class _Result:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class Checkpointer:
    """Saves and resumes one run's training state; every rank builds one, at the same time.
    The :class:`mcore.core.protocols.Checkpointer` of ``mcore train`` and ``mcore rl``."""

    def __init__(self, config: Any, runtime: TrainingRuntime) -> None:
        self.config = config
        self.settings = config.checkpoint
        self.parallel_state = runtime.parallel_state
        self.format = get_format(self.settings.ckpt_format)
        if self.settings.async_save and not self.format.supports_async:
            raise CheckpointingException(
                f"checkpoint.async_save: the {self.format.name!r} format writes synchronously; "
                "use torch_dist for asynchronous saves"
            )
        # Checkpoint collectives get a group of their own (gloo: they carry small CPU
        # objects), so a background save never interleaves with training's collectives.
        self.group: dist.ProcessGroup | None = (
            cast("dist.ProcessGroup", dist.new_group(backend="gloo"))
            if dist.is_initialized()
            else None
        )
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.root = Path(self.settings.save) if self.settings.save else None
        self._worker = _Worker() if self.settings.async_save else None
        self._abort = threading.Event()
        self._in_flight: _Result | None = None
        self._published: list[str] = []
        self.last_save_seconds: float | None = None
        if self.root is not None and self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            directory.clean_stale(self.root)
        _barrier(self.group)

    # -- resume -------------------------------------------------------------------------------

    def resume_path(self) -> Path | None:
        """The checkpoint :meth:`load` will read: ``checkpoint.load`` (it must hold one), else
        the save directory's latest, else ``None`` (a fresh start, whose weights are drawn)."""
        if self.settings.load:
            return directory.resolve(self.settings.load)
        if self.root is not None and (self.root / directory.LATEST).is_file():
            return directory.resolve(self.root)
        return None

    def load(self, chunks: list, optimizer: Any, scheduler: Any) -> dict[str, int] | None:
        """Resume from :meth:`resume_path`, if any; returns the loop state or ``None``."""
        path = self.resume_path()
        if path is None:
            return None
        common = read_common(path)
        fmt = get_format(common["format"])
        self._check_model(path, common, chunks)
        fmt.load(
            path,
            chunks,
            optimizer,
            group=self.group,
            common=common,
            verify_checksums=getattr(self.settings, "verify_checksums", True),
        )
        if scheduler is not None and common.get("scheduler"):
            scheduler.load_state_dict(common["scheduler"])
        scaler = getattr(optimizer, "loss_scaler", None)
        if scaler is not None and common.get("loss_scaler"):
            scaler.load_state_dict(common["loss_scaler"])
        if self.rank == 0:
            print(f"resumed from {path} (step {common.get('iteration', 0)})", flush=True)
        return {
            "iteration": int(common.get("iteration", 0)),
            "consumed_samples": int(common.get("consumed_samples", 0)),
        }

    def _check_model(self, path: Path, common: dict[str, Any], chunks: list) -> None:
        """Name the model-config fields that differ from the ones the checkpoint was saved
        with (the tensors' shapes would disagree too, but less readably)."""
        saved = common.get("model")
        if not saved or not chunks:
            return
        ours = _model_config(chunks)
        shape_fields = (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "kv_channels", "vocab_size", "multi_latent_attention",
            "activation", "normalization", "add_qkv_bias", "add_bias_linear",
            "untie_embeddings_and_output_weights", "position_embedding_type",
        )  # fmt: skip
        differ = [
            f"model.{f}: checkpoint {saved[f]!r}, this run {ours[f]!r}"
            for f in shape_fields
            if f in saved and f in ours and saved[f] != ours[f]
        ]
        if differ:
            raise CheckpointingException(
                f"the checkpoint {str(path)!r} was saved with another model config: "
                + "; ".join(differ)
                + ". Use the model settings it was saved with (mcore ckpt inspect shows them)"
            )

    # -- save ---------------------------------------------------------------------------------

    def save(
        self, iteration: int, chunks: list, optimizer: Any, scheduler: Any, loop_state: dict
    ) -> str | None:
        """Save the training state of ``iteration``; returns the published path, or ``None``
        while it is written in the background."""
        if self.root is None:
            raise CheckpointingException("checkpoint.save is not set: there is nowhere to save")
        self.wait()  # one save in flight: the previous one publishes first
        start = time.perf_counter()
        common = self._common(iteration, chunks, optimizer, scheduler, loop_state)
        prepared = self.format.prepare(chunks, optimizer)
        if self._worker is None:
            path = self._write_and_publish(iteration, prepared, common)
            self.last_save_seconds = time.perf_counter() - start
            return path
        prepared = state.snapshot(prepared)
        self._abort.clear()
        self._in_flight = self._worker.submit(
            lambda: self._write_and_publish(iteration, prepared, common)
        )
        return None

    def _write_and_publish(self, iteration: int, prepared: Any, common: dict) -> str:
        assert self.root is not None, "save() checked checkpoint.save"
        return write_checkpoint(
            self.root,
            iteration,
            lambda folder: self.format.write(folder, prepared, group=self.group, abort=self._abort),
            common,
            group=self.group,
            keep_last=self.settings.keep_last,
            extra_files=self._extra_files(),
        )

    def _extra_files(self) -> dict[str, Path]:
        """The run's tokenizer file, so that the checkpoint is usable on its own (inference)."""
        data = self.config.data if "data" in self.config else None
        path = getattr(data, "tokenizer_path", None)
        if path and Path(path).is_file() and Path(path).name == "tokenizer.json":
            return {"tokenizer.json": Path(path)}
        return {}

    def _common(self, iteration, chunks, optimizer, scheduler, loop_state) -> dict[str, Any]:
        ps = self.parallel_state
        scaler = getattr(optimizer, "loss_scaler", None)
        parallel = self.config.parallel if "parallel" in self.config else None
        return {
            "format": self.format.name,
            "version": VERSION,
            "iteration": iteration,
            "consumed_samples": int(loop_state.get("consumed_samples", 0)),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "loss_scaler": scaler.state_dict() if scaler is not None else None,
            "layout": {
                "world_size": ps.world_size,
                **{f"{d}_size": getattr(ps, f"{d}_size") for d in ("tp", "pp", "dp", "cp")},
                **{f"{d}_size": getattr(ps, f"{d}_size") for d in ("ep", "etp", "edp")},
                "vpp_size": getattr(parallel, "virtual_pipeline_model_parallel_size", None),
                "data_parallel": self.config.train.data_parallel,
            },
            "model": _model_config(chunks),
            "config": self.config.to_dict(),
        }

    # -- in flight ----------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Paths published since the last call (asynchronous saves that finished)."""
        if self._in_flight is not None and self._in_flight.done.is_set():
            self._collect()
        out, self._published = self._published, []
        return out

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; raises its error."""
        if self._in_flight is not None:
            self._in_flight.done.wait()
            self._collect()

    def _collect(self) -> None:
        result, self._in_flight = self._in_flight, None
        assert result is not None, "called with a save in flight"
        if result.error is not None:
            raise result.error
        self._published.append(result.value)

    def finalize(self) -> list[str]:
        """Wait for the save in flight and stop the worker; what was published since polling."""
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.close()
                self._worker = None
        return self.poll()

    def abort(self) -> None:
        """Stop the save in flight between files (on every rank): nothing is published, the
        previous checkpoint stays ``latest``. The worker stays usable."""
        self._abort.set()
        if self._in_flight is not None:
            self._in_flight.done.wait()
            result, self._in_flight = self._in_flight, None
            if result.error is not None and not isinstance(result.error, CheckpointingException):
                raise result.error


def write_checkpoint(
    root: Path,
    iteration: int,
    write_files: Callable[[Path], dict[str, dict[str, int]]],
    common: dict[str, Any],
    *,
    group: dist.ProcessGroup | None,
    keep_last: int | None = None,
    extra_files: dict[str, Path] | None = None,
) -> str:
    """Write and atomically publish the checkpoint of ``iteration`` under ``root``.

    Every rank calls it; ``write_files(folder)`` writes this rank's files into the temporary
    folder and returns them with their sizes and checksums. Only when every rank succeeded does
    rank 0 add ``common.json`` (and copies of ``extra_files``, e.g. the run's tokenizer), publish
    the folder and move ``latest``; otherwise the temporary folder is removed and the error
    raised on every rank. Returns the published path.
    """
    rank = dist.get_rank(group) if group is not None else 0
    tmp = directory.tmp_dir(root, iteration)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(group)
    ok, files, error = True, {}, None
    try:
        files = write_files(tmp)
    except Exception as exc:
        ok, error = False, exc
    # Every rank learns whether every rank wrote its files before anything is published.
    everyone = _gather(group, (ok, files))
    if not all(o for o, _ in everyone):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(group)
        if error is not None:
            raise error
        raise CheckpointingException(
            f"saving step {iteration} failed on another rank; nothing was published"
        )
    if rank == 0:
        common = {**common, "files": {n: i for _, f in everyone for n, i in f.items()}}
        with open(tmp / directory.COMMON, "w") as f:
            json.dump(common, f, indent=1, sort_keys=True)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        directory.publish(root, tmp, iteration)
        directory.prune(root, keep_last)
    _barrier(group)
    return str(root / directory.iteration_name(iteration))


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


def _gather(group: dist.ProcessGroup | None, value: Any) -> list[Any]:
    if group is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _model_config(chunks: list) -> dict[str, Any]:
    config = getattr(unwrap(chunks[0]), "config", None) if chunks else None
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        return {}
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def read_common(path: Path) -> dict[str, Any]:
    """``common.json`` of the checkpoint at ``path``, or a clear error when it is damaged."""
    file = path / directory.COMMON
    if not file.exists() and (path / ".metadata").is_file():
        # Saved by megatron_fsdp.save_checkpoint (plain PyTorch): weights and optimizer state.
        return {"format": "fsdp_dtensor", "iteration": 0}
    try:
        common = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointingException(f"{str(path)!r} has no {directory.COMMON}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointingException(
            f"{str(file)!r} is corrupt ({exc}); load an earlier checkpoint"
        ) from exc
    if not isinstance(common, dict) or "iteration" not in common:
        raise CheckpointingException(f"{str(file)!r} is not an mcore checkpoint record")
    return common
