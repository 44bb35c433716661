"""The core's config sections: what the training driver needs whichever packages are installed.

Field names follow Megatron-Core's arguments, so ``--train.micro-batch-size`` is Megatron's
``--micro-batch-size``. The model, parallel, moe, fsdp, inference and rl sections belong to the
packages that implement them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core.config import ConfigErrors, component


def _positive(errors: ConfigErrors, section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            errors.add(name, f"must be > 0, got {value}")


@dataclass(kw_only=True)
class TrainConfig:
    """How long and how to train: batch sizes, steps, precision, data-parallel wrapper."""

    train_iters: int = field(default=100, metadata={"megatron": "--train-iters"})
    """Number of optimizer steps to run."""
    micro_batch_size: int = field(default=4, metadata={"megatron": "--micro-batch-size"})
    """Sequences per micro-batch on each data-parallel rank."""
    seq_length: int = field(default=256, metadata={"megatron": "--seq-length"})
    """Tokens per training sequence."""
    global_batch_size: int | None = field(
        default=None, metadata={"megatron": "--global-batch-size"}
    )
    """Sequences per optimizer step over all ranks; unset means micro-batch size x DP size."""
    seed: int = field(default=1234, metadata={"megatron": "--seed"})
    """Random seed for initialisation, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks CUDA when available."""
    bf16: bool = field(default=False, metadata={"megatron": "--bf16"})
    """Train in bfloat16 mixed precision (fp32 main weights)."""
    fp16: bool = field(default=False, metadata={"megatron": "--fp16"})
    """Train in float16 mixed precision with dynamic loss scaling."""
    data_parallel: str = component("data_parallel", "ddp")
    """Data-parallel wrapper by registry name (ddp, megatron_fsdp, ...)."""
    exit_interval: int | None = field(default=None, metadata={"megatron": "--exit-interval"})
    """Stop (saving a checkpoint) once the step number is a multiple of this."""
    eval_interval: int | None = field(default=None, metadata={"megatron": "--eval-interval"})
    """Run evaluation every this many steps: eval_iters global batches of the validation
    split, forward only, the model in eval mode; valid_loss and valid_ppl go to the console,
    metrics.jsonl and TensorBoard. Unset disables evaluation."""
    eval_iters: int = field(default=10, metadata={"megatron": "--eval-iters"})
    """Global batches per evaluation (each evaluation reads the next ones of the split)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """Regional torch.compile: each transformer layer is compiled on its own (one graph per
    layer kind, reused by every layer of that kind). auto compiles on CUDA and runs eagerly on
    CPU, where compiling costs more than a short run saves (one log line says which); on
    compiles on any device; off never. A layer that cannot be compiled runs eagerly."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend of train.compile: inductor generates fused kernels; aot_eager and
    eager only trace (they check that compiled regions compose, without kernel generation)."""

    def validate(self, errors: ConfigErrors) -> None:
        _positive(
            errors, self, "train_iters", "micro_batch_size", "global_batch_size", "seq_length"
        )
        _positive(errors, self, "eval_interval", "eval_iters", "exit_interval")
        if self.bf16 and self.fp16:
            errors.add("fp16", "bf16 and fp16 are mutually exclusive; choose one")
        gbs, mbs = self.global_batch_size, self.micro_batch_size
        if gbs is not None and mbs > 0 and gbs % mbs:
            errors.add(
                "global_batch_size", f"must be a multiple of micro_batch_size ({mbs}), got {gbs}"
            )


@dataclass(kw_only=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: str = component("optimizer", "adam", metadata={"megatron": "--optimizer"})
    """Optimizer by registry name."""
    lr: float = field(default=3e-4, metadata={"megatron": "--lr"})
    """Peak learning rate."""
    min_lr: float = field(default=0.0, metadata={"megatron": "--min-lr"})
    """Learning rate at the end of decay."""
    weight_decay: float = field(default=0.01, metadata={"megatron": "--weight-decay"})
    """Decoupled weight decay."""
    adam_beta1: float = field(default=0.9, metadata={"megatron": "--adam-beta1"})
    """Adam's first-moment decay."""
    adam_beta2: float = field(default=0.95, metadata={"megatron": "--adam-beta2"})
    """Adam's second-moment decay."""
    adam_eps: float = field(default=1e-8, metadata={"megatron": "--adam-eps"})
    """Adam's denominator epsilon."""
    clip_grad: float = field(default=1.0, metadata={"megatron": "--clip-grad"})
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    lr_warmup_iters: int = field(default=0, metadata={"megatron": "--lr-warmup-iters"})
    """Steps of linear warmup from 0 to lr."""
    lr_decay_style: Literal["constant", "linear", "cosine", "WSD"] = field(
        default="cosine", metadata={"megatron": "--lr-decay-style"}
    )
    """Decay after warmup."""
    lr_decay_iters: int | None = field(default=None, metadata={"megatron": "--lr-decay-iters"})
    """Steps over which lr decays; unset means train.train_iters."""
    lr_wsd_decay_iters: int | None = field(
        default=None, metadata={"megatron": "--lr-wsd-decay-iters"}
    )
    """For WSD: length of the final decay phase."""
    use_distributed_optimizer: bool = field(
        default=False, metadata={"megatron": "--use-distributed-optimizer"}
    )
    """Shard optimizer state and fp32 main weights over data-parallel ranks."""
    optimizer_cpu_offload: bool = field(
        default=False, metadata={"megatron": "--optimizer-cpu-offload"}
    )
    """Keep optimizer state on the CPU."""
    optimizer_offload_fraction: float = field(
        default=1.0, metadata={"megatron": "--optimizer-offload-fraction"}
    )
    """Fraction of optimizer state offloaded when optimizer_cpu_offload is on."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """How the torch optimizer updates its tensors: fused (one kernel for all of them, on CPU
    and CUDA), foreach (one kernel per operation over all tensors) or for_loop (tensor by
    tensor); auto picks fused where torch has it for the parameters, else foreach."""

    def validate(self, errors: ConfigErrors) -> None:
        _positive(errors, self, "lr", "adam_eps", "lr_decay_iters", "lr_wsd_decay_iters")
        if self.min_lr < 0 or self.min_lr > self.lr:
            errors.add("min_lr", f"must lie in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                errors.add(name, f"must lie in [0, 1), got {value}")
        for name in ("weight_decay", "clip_grad", "lr_warmup_iters"):
            if getattr(self, name) < 0:
                errors.add(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            errors.add(
                "optimizer_offload_fraction",
                f"must lie in [0, 1], got {self.optimizer_offload_fraction}",
            )
        if self.lr_decay_style == "WSD" and self.lr_wsd_decay_iters is None:
            errors.add("lr_wsd_decay_iters", "is required when lr_decay_style is 'WSD'")


@dataclass(kw_only=True)
class DataConfig:
    """Training data and tokenizer."""

    dataset: str = component("dataset", "python_stdlib")
    """Dataset by registry name; the default is the running Python's standard library source."""
    data_path: list[str] = field(default_factory=list, metadata={"megatron": "--data-path"})
    """Indexed dataset prefixes, optionally weighted: ["0.7", "a", "0.3", "b"] as in Megatron."""
    tokenizer: str = component("tokenizer", "byte")
    """Tokenizer by registry name."""
    tokenizer_path: str | None = field(default=None, metadata={"megatron": "--tokenizer-model"})
    """Path of a tokenizer.json for file-based tokenizers."""
    split: str = field(default="969,30,1", metadata={"megatron": "--split"})
    """Train, validation and test proportions."""
    num_workers: int = field(default=2, metadata={"megatron": "--num-workers"})
    """Data-loader worker processes per rank."""
    cache_dir: str | None = field(default=None, metadata={"megatron": "--data-cache-path"})
    """Where dataset indices are cached; unset means beside the data."""
    max_bytes: int | None = None
    """python_stdlib: cap on the source bytes read (smaller corpora build faster)."""
    allow_ambiguous_pad_tokens: bool = field(
        default=False, metadata={"megatron": "--allow-ambiguous-pad-tokens"}
    )
    """Accept a tokenizer whose PAD id equals EOD/BOS (real EOD labels then lose their loss)."""
    eod_mask_loss: bool = field(default=False, metadata={"megatron": "--eod-mask-loss"})
    """Exclude end-of-document labels from the loss."""
    reset_position_ids: bool = field(default=False, metadata={"megatron": "--reset-position-ids"})
    """Restart position ids at every document boundary inside a sample."""
    fim_rate: float = 0.0
    """Fraction of samples rewritten as fill-in-the-middle."""
    fim_spm_rate: float = 0.5
    """Of FIM samples, the fraction in suffix-prefix-middle order (the rest in PSM)."""
    fim_split_token: str | None = None
    """FIM: split documents into fragments at this token, each rewritten on its own."""
    fim_fragment_rate: float | None = None
    """FIM: per-fragment rate when documents are split; unset uses fim_rate."""
    fim_no_prefix: str | None = None
    """FIM: skip samples starting with this string."""

    def validate(self, errors: ConfigErrors) -> None:
        _positive(errors, self, "max_bytes")
        for name in ("fim_rate", "fim_spm_rate", "fim_fragment_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                errors.add(name, f"must lie in [0, 1], got {value}")
        if self.num_workers < 0:
            errors.add("num_workers", f"must be >= 0, got {self.num_workers}")
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0 or len(weights) > 3:
            errors.add(
                "split", f"must be up to 3 non-negative numbers like '969,30,1', got {self.split!r}"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often checkpoints are saved, and what to resume from."""

    save: str | None = field(default=None, metadata={"megatron": "--save"})
    """Directory to save checkpoints to; unset disables saving."""
    load: str | None = field(default=None, metadata={"megatron": "--load"})
    """Directory to resume from; unset means the save directory when it has a checkpoint."""
    save_interval: int | None = field(default=None, metadata={"megatron": "--save-interval"})
    """Save every this many steps (and at the end); unset saves only at the end."""
    ckpt_format: str = component(
        "checkpoint_format", "torch_dist", metadata={"megatron": "--ckpt-format"}
    )
    """Checkpoint format by registry name (torch_dist, fsdp_dtensor, hf)."""
    async_save: bool = field(default=False, metadata={"megatron": "--async-save"})
    """Write checkpoints in a background worker while training continues."""
    keep_last: int | None = None
    """Keep only this many most recent checkpoints; unset keeps all."""
    verify_checksums: bool = True
    """Check each shard file's CRC-32 before loading (reads the files once more, spread over
    the ranks); sizes are always checked."""

    def validate(self, errors: ConfigErrors) -> None:
        _positive(errors, self, "save_interval", "keep_last")
        if self.async_save and self.save is None:
            errors.add("async_save", "needs checkpoint.save to be set")


@dataclass(kw_only=True)
class LoggerConfig:
    """Console, JSONL and TensorBoard logging."""

    log_interval: int = field(default=10, metadata={"megatron": "--log-interval"})
    """Print and record metrics every this many steps."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the mcore loggers' messages on the console (``logging`` records of the
    ``mcore`` and ``megatron_*`` packages; the metrics lines are printed whatever it is)."""
    metrics_file: str | None = None
    """Append one JSON line of metrics per logged step to this file."""
    tensorboard_dir: str | None = field(default=None, metadata={"megatron": "--tensorboard-dir"})
    """Write TensorBoard events here; unset disables TensorBoard."""
    progress_bar: bool = True
    """Show a progress bar on an interactive terminal."""
    timing_log_level: int = field(default=0, metadata={"megatron": "--timing-log-level"})
    """Timers to report: 0 none, 1 per-step phases, 2 everything."""

    def validate(self, errors: ConfigErrors) -> None:
        _positive(errors, self, "log_interval")
        if self.timing_log_level not in (0, 1, 2):
            errors.add("timing_log_level", f"must be 0, 1 or 2, got {self.timing_log_level}")


@dataclass(kw_only=True)
class StragglerDetectionConfig:
    """Find ranks that run slower than the rest."""

    log_straggler: bool = field(default=False, metadata={"megatron": "--log-straggler"})
    """Measure per-rank step time and report the slowest ranks."""
    straggler_minmax_count: int = field(
        default=1, metadata={"megatron": "--straggler-minmax-count"}
    )
    """How many slowest and fastest ranks to report."""

    def validate(self, errors: ConfigErrors) -> None:
        _positive(errors, self, "straggler_minmax_count")


@dataclass(kw_only=True)
class ProfileConfig:
    """Profiling: a torch.profiler trace of chosen steps, and named ranges for Nsight Systems."""

    profile: bool = field(default=False, metadata={"megatron": "--profile"})
    """Record a torch.profiler Chrome trace (CPU activity, plus CUDA on a GPU) of steps
    [profile_step_start, profile_step_end) on the ranks in profile_ranks, written to
    trace_dir/rank{R}_steps{A}-{B}.json, A and B the first and last step traced (open it in
    Perfetto or chrome://tracing); the named ranges (see nvtx_ranges) are on while it records.
    For Nsight Systems use nvtx_ranges instead (the two profilers do not share CUPTI)."""
    profile_step_start: int = field(default=10, metadata={"megatron": "--profile-step-start"})
    """First step profiled (steps count from 1)."""
    profile_step_end: int = field(default=12, metadata={"megatron": "--profile-step-end"})
    """Step at which profiling stops; this step is not profiled."""
    profile_ranks: list[int] = field(
        default_factory=lambda: [0], metadata={"megatron": "--profile-ranks"}
    )
    """Global ranks that record a trace."""
    nvtx_ranges: bool = False
    """Mark nested named ranges on every rank at every step: ``step N`` (the whole iteration,
    logging and checkpointing included), ``forward``, ``loss`` and ``backward`` (each
    micro-batch), ``layer N`` (each transformer layer's forward; N counts from 0 over the whole
    model), ``grad-sync`` (the data-parallel and tied-embedding gradient reductions) and
    ``optimizer`` (which encloses grad-sync). On CUDA they are NVTX ranges (Nsight Systems shows
    them), and on any device torch.profiler record_function ranges. Without it they are marked
    only while profile records a trace."""
    trace_dir: str | None = None
    """Where traces are written; unset means checkpoint.save/profile, or ./profile when nothing
    is saved."""
    record_shapes: bool = False
    """torch.profiler: record the input shapes of every operator (``Input Dims`` in the trace)."""
    profile_memory: bool = False
    """torch.profiler: record tensor allocations and frees (``[memory]`` events in the trace)."""

    def validate(self, errors: ConfigErrors) -> None:
        start, end = self.profile_step_start, self.profile_step_end
        if start < 1:
            errors.add("profile_step_start", f"must be >= 1 (steps count from 1), got {start}")
        if end <= start:
            errors.add("profile_step_end", f"must be > profile_step_start ({start}), got {end}")
        negative = [r for r in self.profile_ranks if r < 0]
        if negative:
            errors.add("profile_ranks", f"ranks must be >= 0, got {negative}")


CORE_SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logger": LoggerConfig,
    "straggler": StragglerDetectionConfig,
    "profile": ProfileConfig,
}
