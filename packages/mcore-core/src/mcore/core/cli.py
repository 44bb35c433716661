"""The ``mcore`` command: sub-commands come from the ``cli_command`` registry."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Sequence
from typing import Any

from mcore.core.config import config_sections, normalize_flags
from mcore.core.errors import McoreError
from mcore.core.plugins import get_plugin_manager


def build_parser() -> argparse.ArgumentParser:
    """The full ``mcore`` parser, one sub-parser per registered command."""
    from mcore.core import __version__

    manager = get_plugin_manager()
    commands = manager.registries["cli_command"]
    parser = argparse.ArgumentParser(
        prog="mcore",
        allow_abbrev=False,
        description="mcore: modular Megatron-Core. Sub-commands come from installed plugins.",
    )
    parser.add_argument("--version", action="version", version=f"mcore-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for component in commands.components():
        cmd = component.obj
        p = sub.add_parser(component.name, help=cmd.help, description=cmd.help, allow_abbrev=False)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _unrecognized(extra: list[str], manager: Any) -> str:
    """Name the unknown arguments, suggesting the config flag a dotted one probably meant."""
    flags = [
        f"--{section}.{name.replace('_', '-')}"
        for section, cls in config_sections(manager).items()
        for f in dataclasses.fields(cls)
        for name in (f.name, *f.metadata.get("aliases", ()))
    ]
    lines = [f"unrecognized arguments: {' '.join(extra)}"]
    for arg in extra:
        key = arg.split("=", 1)[0]
        if not (key.startswith("--") and "." in key):
            continue
        section, field = key[2:].split(".", 1)
        same_field = [f for f in flags if f.rsplit(".", 1)[1] == field]
        guess = same_field or difflib.get_close_matches(key, flags, n=1)
        hint = manager.missing_hint("config_section", section.replace("-", "_"))
        if guess:
            lines.append(f"  {key}: did you mean {' or '.join(guess)}?")
        elif hint:
            lines.append(f"  {key}: no section [{section}] is loaded. {hint}")
        else:
            lines.append(f"  {key}: no such config field (see --help)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mcore`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    manager = get_plugin_manager()
    commands = manager.registries["cli_command"]
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        try:
            commands.component(argv[0])
        except McoreError as exc:
            print(f"mcore: {exc}", file=sys.stderr)
            return 2
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(normalize_flags(argv))
    except McoreError as exc:
        print(f"mcore: error: {exc}", file=sys.stderr)
        return 2
    if extra:
        print(f"mcore: error: {_unrecognized(extra, manager)}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    # What followed the command name, for commands that re-launch themselves (mcore train).
    args.command_argv = argv[argv.index(args.command) + 1 :]
    if args.command != "plugins":
        for failed in manager.failures:
            print(
                f"mcore: warning: plugin {failed.name!r} failed to load ({failed.error}); "
                f"see 'mcore plugins'",
                file=sys.stderr,
            )
    try:
        return int(args._run(args) or 0)
    except McoreError as exc:
        print(f"mcore {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`mcore plugins | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
