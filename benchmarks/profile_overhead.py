"""What the named profiling ranges cost: ``mcore train``'s step with ``profile.nvtx_ranges``
off and on.

One process runs alternating rounds (off, on, on, off, ...), each a short ``mcore train`` run
of the same small model on the same data; each round's first ``--warmup`` steps are dropped
and the rest give its median step time. Prints each round, then the median tokens/s of each
setting over its rounds and the overhead (on / off - 1), with the spread of the off rounds as
the noise floor. Two less noisy figures follow: the cost of one range, off and on, times the
ranges a step opens; and one long run with the ranges switched on every other step, each
on-step against its two neighbours. The ranges are record_function ranges on any device, plus
NVTX on CUDA; a step opens ``3 + micro_batches * (3 + layers)`` of them.

    uv run python benchmarks/profile_overhead.py                 # CPU, fp32, ~1 min idle
    uv run python benchmarks/profile_overhead.py --rounds 3 --steps 8   # quicker, noisier
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch

from mcore.core import hookimpl, load_config, register_plugin, unregister_plugin
from mcore.core.training.loop import train
from mcore.core.training.profiling import ranges


def microseconds_per_range(n: int = 20000) -> tuple[float, float]:
    """Entering and leaving one range, off and on (median of 5 runs of ``n``), in us."""

    def timed() -> float:
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                with ranges.range("layer", 3):
                    pass
            runs.append((time.perf_counter() - start) / n * 1e6)
        return statistics.median(runs)

    ranges.disable()
    off = timed()
    ranges.enable()
    on = timed()
    ranges.disable()
    return off, on


class _ToggleRanges:
    """A run-time plugin: the ranges on for even steps, off for odd ones. With
    ``control=True`` it switches nothing: the same run then measures how much even steps
    differ from odd ones by themselves, the bias of the paired figure."""

    def __init__(self, control: bool = False) -> None:
        self.control = control

    @hookimpl
    def mcore_on_step_end(self, trainer, step, metrics) -> None:
        # The next step (even when this one is odd) gets the ranges.
        ranges.set(step % 2 == 1 and not self.control)


def paired_overhead(seconds: list[float], warmup: int) -> float:
    """Median over the even (ranges on) steps of their time over the mean of the two odd
    neighbours', minus one: adjacent steps share the machine's state, so drift cancels."""
    ratios = [
        seconds[i] / ((seconds[i - 1] + seconds[i + 1]) / 2)
        for i in range(warmup + 1, len(seconds) - 1)
        if (i + 1) % 2 == 0  # step i + 1 is even
    ]
    return statistics.median(ratios) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each setting")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped per round")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--gbs", type=int, default=8, help="global batch: gbs/mbs micro-batches")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    def run(ranges_on: bool, steps: int) -> list[float]:
        config = load_config(
            overrides={
                "train.train-iters": str(steps),
                "train.micro-batch-size": str(args.mbs),
                "train.global-batch-size": str(args.gbs),
                "train.seq-length": str(args.seq),
                "train.device": args.device,
                "model.num-layers": str(args.layers),
                "model.hidden-size": str(args.hidden),
                "model.num-attention-heads": str(args.heads),
                "logger.log-interval": str(10**6),
                "logger.progress-bar": "false",
                "data.max-bytes": "2000000",
                "profile.nvtx-ranges": str(ranges_on).lower(),
            }
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own lines
            return train(config).step_seconds

    def round_seconds(ranges_on: bool) -> float:
        return statistics.median(run(ranges_on, args.steps)[args.warmup :])

    tokens = args.gbs * args.seq
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    micro = args.gbs // args.mbs
    # step, optimizer, grad-sync; per micro-batch forward, loss, backward and one per layer
    per_step_ranges = 3 + micro * (3 + args.layers)
    print(
        f"{args.layers} layers, hidden {args.hidden}, {micro} micro-batch(es) of "
        f"{args.mbs}x{args.seq} tokens, {device}, {torch.get_num_threads()} threads; "
        f"{args.rounds} rounds x {args.steps} steps per setting, "
        f"{per_step_ranges} ranges per step"
    )
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.rounds):
        for on in (False, True) if i % 2 == 0 else (True, False):  # ABBA: drift cancels
            seconds[on].append(round_seconds(on))
            label = "on " if on else "off"
            print(f"  round {i + 1} ranges {label}: {tokens / seconds[on][-1]:8.0f} tokens/s")
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    per_off, per_on = microseconds_per_range()
    per_step = per_step_ranges * (per_on - per_off) * 1e-6
    print(
        f"one range: {per_off:.2f} us off, {per_on:.2f} us on; {per_step_ranges} per step add "
        f"{1000 * per_step:.3f} ms = {100 * per_step / off:.3f}% of the off step"
    )
    spread = (max(seconds[False]) - min(seconds[False])) / off
    print(f"ranges off: {tokens / off:8.0f} tokens/s (median step {1000 * off:.1f} ms)")
    print(f"ranges on:  {tokens / on:8.0f} tokens/s (median step {1000 * on:.1f} ms)")
    print(
        f"overhead (on / off - 1): {100 * (on / off - 1):+.2f}% "
        f"(spread of the off rounds {100 * spread:.1f}%)"
    )
    paired = {}
    for control in (True, False):
        register_plugin(_ToggleRanges(control), name="toggle-ranges")
        try:
            paired[control] = paired_overhead(run(False, args.rounds * args.steps), args.warmup)
        finally:
            unregister_plugin("toggle-ranges")
    steps = args.rounds * args.steps
    print(
        f"paired steps, one run of {steps} steps with the ranges on every other step: "
        f"even / odd {100 * paired[False]:+.2f}%; the same run with nothing switched (even "
        f"steps against odd ones alone) {100 * paired[True]:+.2f}%; overhead "
        f"{100 * (paired[False] - paired[True]):+.2f}%"
    )


if __name__ == "__main__":
    main()
