"""The core's own sub-commands: ``mcore plugins`` and ``mcore config show``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mcore.core.config import (
    add_config_arguments,
    check_components,
    config_sections,
    load_config,
    overrides_from_args,
)
from mcore.core.plugins import get_plugin_manager
from mcore.core.registry import CliCommand


def plugins_report() -> dict[str, Any]:
    """What ``mcore plugins --json`` prints: loaded plugins with their components, and failures.

    ``{"plugins": [{"name", "version", "package", "components": {kind: [names]}, "hooks"}],
    "failed": [{"name", "version", "package", "error"}]}``, plus ``"not_loaded"`` when
    ``MCORE_LOAD_PLUGINS`` left installed plugins out.
    """
    manager = get_plugin_manager()
    report: dict[str, Any] = {
        "plugins": [
            {
                "name": p.name,
                "version": p.version,
                "package": p.package,
                "components": manager.components_of(p.name),
                "hooks": manager.hooks_of(p.name),
            }
            for p in manager.plugins.values()
            if p.ok
        ],
        "failed": [
            {"name": p.name, "version": p.version, "package": p.package, "error": p.error}
            for p in manager.failures
        ],
    }
    if manager.ignored:
        report["not_loaded"] = list(manager.ignored)
    return report


def _plugins_configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show tracebacks of plugins that failed"
    )


def _plugins_run(args: argparse.Namespace) -> int:
    report = plugins_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if report["failed"] else 0
    rows: list[tuple[str, str, str, str]] = []
    for p in report["plugins"]:
        comps = [f"{kind}: {', '.join(names)}" for kind, names in p["components"].items()]
        if p["hooks"]:
            comps.append(f"hooks: {', '.join(p['hooks'])}")
        comps = comps or ["(no components)"]
        rows.append((p["name"], p["version"] or "-", p["package"] or "(run time)", comps[0]))
        rows += [("", "", "", c) for c in comps[1:]]
    for p in report["failed"]:
        rows.append((p["name"], p["version"] or "-", p["package"] or "-", f"FAILED: {p['error']}"))
    header = ("PLUGIN", "VERSION", "PACKAGE", "COMPONENTS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    if report.get("not_loaded"):
        names = ", ".join(report["not_loaded"])
        print(f"\nNot loaded (MCORE_LOAD_PLUGINS): {names}")
    if args.verbose:
        for p in get_plugin_manager().failures:
            print(f"\n--- {p.name} ---\n{p.details}", file=sys.stderr)
    return 1 if report["failed"] else 0


def _config_configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        allow_abbrev=False,
        help="print the resolved config (defaults < FILE < overrides)",
        description="Print the resolved config: section defaults, then FILE, then overrides.",
    )
    show.add_argument("file", nargs="?", metavar="FILE", help="TOML config file")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.add_argument(
        "--check",
        action="store_true",
        help="also resolve every component name (router, optimizer, ...) in the registries",
    )
    manager = get_plugin_manager()
    owners = {c.name: c.plugin for c in manager.registries["config_section"].components()}
    add_config_arguments(show, config_sections(manager), owners)


def _config_run(args: argparse.Namespace) -> int:
    config = load_config(args.file, overrides_from_args(args))
    print(json.dumps(config.to_dict(), indent=2) if args.json else config.to_toml(), end="")
    if args.json:
        print()
    if args.check:
        problems = check_components(config, get_plugin_manager().registries)
        for problem in problems:
            print(f"mcore config: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


PLUGINS = CliCommand(
    help="list installed plugins, their versions and the components each adds",
    configure=_plugins_configure,
    run=_plugins_run,
)
CONFIG = CliCommand(
    help="show the resolved configuration", configure=_config_configure, run=_config_run
)
