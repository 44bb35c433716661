"""``mcore train [FILE] [--nproc N] [--section.field VALUE ...]``.

Under torchrun (``WORLD_SIZE`` set) every rank runs the loop. Otherwise ``--nproc N`` (default:
one rank per GPU, or 2 CPU ranks with gloo) starts the local ranks through torch's elastic
launcher, which runs this same command in each of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mcore.core.config import (
    Config,
    ConfigError,
    add_config_arguments,
    check_components,
    config_sections,
    load_config,
    overrides_from_args,
)
from mcore.core.plugins import get_plugin_manager
from mcore.core.registry import CliCommand

DEFAULT_SAVE = "mcore-run"


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


def default_nproc() -> int:
    """Local ranks to start when none are asked for: one per GPU, else 2 CPU ranks."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def launch_local_ranks(command: str, nproc: int, argv: list[str]) -> int:
    """Run ``mcore COMMAND argv`` on ``nproc`` local ranks with torch's elastic launcher
    (what ``mcore train --nproc N`` does; other commands that train, such as ``mcore rl``,
    launch the same way). ``argv`` must not hold ``--nproc`` (see :func:`without_nproc`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "mcore.core.cli", command, *argv]
    )
    try:
        run(args)
    except ChildFailedError as error:
        # Each rank has printed its own error; the launcher's traceback would bury it.
        rank, failure = error.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(
            f"mcore {command}: rank {rank} of {nproc} exited with code {failure.exitcode}; "
            "its error is above",
            file=sys.stderr,
        )
        return code
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N``."""
    return [a for i, a in enumerate(argv) if not _is_nproc(argv, i)]


def training_command(
    command: str, *, help: str, default_save: str, run: Callable[[Config], int]
) -> CliCommand:
    """``mcore COMMAND [FILE] [--nproc N] [--section.field VALUE ...]`` for a command that
    trains (``train``, ``rl``): the config is loaded and its components checked once, before
    any rank starts; ``checkpoint.save`` defaults to ``default_save`` where a checkpoint plugin
    is installed (metrics.jsonl goes there too); outside torchrun the local ranks are launched;
    then every rank calls ``run(config)``."""

    def main(args: argparse.Namespace) -> int:
        manager = get_plugin_manager()
        overrides = overrides_from_args(args)
        config = load_config(args.file, overrides)  # validate before starting any rank
        if config.checkpoint.save is None and manager.registries.names("checkpoint_format"):
            overrides["checkpoint.save"] = default_save
            config = load_config(args.file, overrides)
        problems = check_components(config, manager.registries, skip_empty_kinds=True)
        if problems:  # an unknown router or dispatcher fails here, not once per launched rank
            raise ConfigError(problems)
        if "WORLD_SIZE" not in os.environ:
            nproc = args.nproc or default_nproc()
            if nproc > 1:  # argv: what the user typed after `mcore COMMAND`
                return launch_local_ranks(command, nproc, without_nproc(args.command_argv))
        return run(config)

    return CliCommand(help=help, configure=_configure, run=main)


def _train(config: Config) -> int:
    from mcore.core.training.loop import train

    result = train(config)
    if result.checkpoint and is_rank_zero():
        print(f"checkpoint: {result.checkpoint}")
    return 0


def _is_nproc(argv: list[str], i: int) -> bool:
    arg = argv[i]
    return arg == "--nproc" or arg.startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or runs alone)."""
    return os.environ.get("RANK", "0") == "0"


TRAIN = training_command(
    "train",
    help="train a model (default: a small GPT on the Python standard library's source)",
    default_save=DEFAULT_SAVE,
    run=_train,
)
