"""``mcore plan [FILE] --world-size N [--gpu-memory-gb G] [--json] [--section.field VALUE ...]``:
what each rank of a run would hold, send and compute, without launching it."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    from mcore.core.config import add_config_arguments, config_sections
    from mcore.core.plugins import get_plugin_manager

    parser.add_argument("file", nargs="?", metavar="FILE", help="TOML config file")
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the run")
    parser.add_argument(
        "--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GiB (default 80)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    manager = get_plugin_manager()
    owners = {c.name: c.plugin for c in manager.registries["config_section"].components()}
    add_config_arguments(parser, config_sections(manager), owners)


def run(args: argparse.Namespace) -> int:
    from mcore.core.config import ConfigError, check_components, load_config, overrides_from_args
    from mcore.core.plugins import get_plugin_manager

    config = load_config(args.file, overrides_from_args(args))  # the errors mcore train gives
    registries = get_plugin_manager().registries
    problems = check_components(config, registries, skip_empty_kinds=True)
    if problems:
        raise ConfigError(problems)
    from mcore.parallel.plan.planner import check_layout, make_plan
    from mcore.parallel.plan.report import render

    check_layout(config, args.world_size)  # before importing or building any model
    plan = make_plan(
        config, args.world_size, gpu_memory_gb=args.gpu_memory_gb, registries=registries
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0
