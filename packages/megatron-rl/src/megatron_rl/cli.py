"""``mcore rl [FILE] [--nproc N] [--section.field VALUE ...]``: GRPO post-training.

Launches like ``mcore train``: under torchrun every rank runs the loop; otherwise ``--nproc N``
(default: one rank per GPU, or 2 CPU ranks with gloo) starts the local ranks. The config is
checked, and the environment and agent looked up, before any rank starts.
"""

from __future__ import annotations

import argparse
import os

from mcore.core import CliCommand
from mcore.core.config import (
    ConfigError,
    add_config_arguments,
    check_components,
    config_sections,
    load_config,
    overrides_from_args,
)
from mcore.core.plugins import get_plugin_manager

DEFAULT_SAVE = "mcore-rl-run"


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="local ranks to launch (default: one per GPU, else 2 CPU ranks; none under torchrun)",
    )
    manager = get_plugin_manager()
    owners = {c.name: c.plugin for c in manager.registries["config_section"].components()}
    add_config_arguments(parser, config_sections(manager), owners)


def _run(args: argparse.Namespace) -> int:
    from mcore.core.training.cli import default_nproc, launch_local_ranks, without_nproc

    manager = get_plugin_manager()
    overrides = overrides_from_args(args)
    config = load_config(args.file, overrides)  # validate before starting any rank
    if config.checkpoint.save is None and manager.registries.names("checkpoint_format"):
        overrides["checkpoint.save"] = DEFAULT_SAVE  # where metrics.jsonl and checkpoints go
        config = load_config(args.file, overrides)
    problems = check_components(config, manager.registries, skip_empty_kinds=True)
    if problems:
        raise ConfigError(problems)
    if "WORLD_SIZE" not in os.environ:
        nproc = args.nproc or default_nproc()
        if nproc > 1:
            return launch_local_ranks("rl", nproc, without_nproc(args.command_argv))
    from megatron_rl.loop import train_rl

    result = train_rl(config)
    if os.environ.get("RANK", "0") == "0":
        if result.metrics:
            first, last = result.rewards[0], result.rewards[-1]
            print(f"mean reward: step 1 {first:.3f} -> step {len(result.rewards)} {last:.3f}")
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
    return 0


RL = CliCommand(
    help="GRPO post-training: rollouts on the inference engine, packed updates, weight refit",
    configure=_configure,
    run=_run,
)
