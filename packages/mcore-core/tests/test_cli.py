"""The ``mcore`` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mcore.core import cli
from mcore.core.plugins import reset_plugin_manager


@pytest.fixture(autouse=True)
def core_only(monkeypatch: pytest.MonkeyPatch):
    """Run the CLI with only the core's plugin, whatever else is installed."""
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_json_lists_the_core_and_its_components(capsys) -> None:
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    report = json.loads(out)
    [core] = report["plugins"]
    assert core["name"] == core["package"] == "mcore-core"
    assert core["version"] == "0.1.0"
    assert core["components"] == {
        "cli_command": ["config", "data", "plot", "plugins", "train"],
        "config_section": [
            "checkpoint",
            "data",
            "logger",
            "optimizer",
            "profile",
            "straggler",
            "train",
        ],
        "dataset": ["indexed", "python_stdlib"],
        "tokenizer": ["byte", "hf"],
    }
    assert report["failed"] == []


def test_plugins_table_is_readable(capsys) -> None:
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["PLUGIN", "VERSION", "PACKAGE", "COMPONENTS"]
    assert lines[1].split()[:3] == ["mcore-core", "0.1.0", "mcore-core"]
    assert "dataset: indexed, python_stdlib" in lines[1]
    assert "config_section: checkpoint, data" in "\n".join(lines[2:5])


def test_config_show_resolves_file_and_overrides(capsys, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\ntrain_iters = 50\n[optimizer]\nlr = 0.001\n")
    code, out, _ = run(
        capsys, "config", "show", str(recipe), "--train.train-iters", "7", "--train.bf16"
    )
    assert code == 0
    shown = tomllib.loads(out)
    assert shown["train"]["train_iters"] == 7
    assert shown["train"]["bf16"] is True
    assert shown["optimizer"]["lr"] == 0.001
    assert shown["logger"]["log_interval"] == 10


def test_config_show_json(capsys) -> None:
    code, out, _ = run(capsys, "config", "show", "--json", "--optimizer.lr=0.5")
    assert code == 0
    assert json.loads(out)["optimizer"]["lr"] == 0.5


def test_config_errors_name_the_field_and_exit_2(capsys) -> None:
    code, out, err = run(capsys, "config", "show", "--train.train-iters", "lots")
    assert code == 2 and out == ""
    assert "train.train_iters: expected an integer, got 'lots'" in err


def test_misplaced_flag_gets_a_suggestion(capsys) -> None:
    code, _, err = run(capsys, "config", "show", "--train.lr", "3")
    assert code == 2
    assert "did you mean --optimizer.lr?" in err


def test_config_show_check_resolves_components(capsys) -> None:
    code, _, err = run(capsys, "config", "show", "--check")
    assert code == 1
    assert "optimizer.optimizer: unknown optimizer 'adam'" in err


def test_config_help_lists_fields_with_their_docs(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "show", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--train.micro-batch-size INT" in out
    assert "Sequences per micro-batch on each data-parallel rank. (default: 4)" in out


def test_unknown_command_says_so(capsys) -> None:
    code, _, err = run(capsys, "trian")
    assert code == 2
    assert "unknown command 'trian'. Known: config, data, plot, plugins, train." in err
    assert "Did you mean 'train'?" in err


def test_command_of_an_uninstalled_package_says_what_to_install(capsys) -> None:
    code, _, err = run(capsys, "serve")
    assert code == 2
    # Installed in this workspace but left out by MCORE_LOAD_PLUGINS, which the hint says.
    assert "It is provided by mcore-inference" in err


def test_no_command_prints_help(capsys) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    assert "plugins" in out and "config" in out


def test_broken_plugin_is_listed_and_warned_about(capsys, make_dist, monkeypatch) -> None:
    make_dist(
        "zz-broken",
        {"zz-broken": "zz_broken_mod"},
        {"zz_broken_mod.py": "raise ImportError('no gpu')\n"},
    )
    monkeypatch.delenv("MCORE_LOAD_PLUGINS")
    reset_plugin_manager()
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 1  # a broken plugin is worth a non-zero exit, as in the table form
    [failed] = json.loads(out)["failed"]
    assert failed["name"] == "zz-broken" and "ImportError: no gpu" in failed["error"]
    code, out, _ = run(capsys, "plugins")
    assert code == 1
    assert "FAILED: import of 'zz_broken_mod' failed: ImportError: no gpu" in out
    code, _, err = run(capsys, "config", "show")
    assert code == 0
    assert "warning: plugin 'zz-broken' failed to load" in err


def test_console_script_runs_in_a_subprocess() -> None:
    script = Path(sys.executable).with_name("mcore")
    assert script.exists(), "the mcore console script is not installed"
    result = subprocess.run(
        [str(script), "plugins", "--json"],
        capture_output=True,
        text=True,
        env={"MCORE_LOAD_PLUGINS": "", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert [p["name"] for p in json.loads(result.stdout)["plugins"]] == ["mcore-core"]


HELLO_PLUGIN = """
from mcore.core import CliCommand, hookimpl

def configure(parser):
    parser.add_argument("--name", default="world")

def run(args):
    print(f"hello {args.name}")
    return 0

@hookimpl
def mcore_register(registry):
    registry.add("cli_command", "hello", CliCommand(help="say hello", configure=configure, run=run))
"""


def test_sub_commands_of_other_packages_come_in_through_the_hook(
    capsys, make_dist, monkeypatch
) -> None:
    make_dist(
        "mcore-hello", {"mcore-hello": "mcore_hello_mod"}, {"mcore_hello_mod.py": HELLO_PLUGIN}
    )
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "mcore-hello")
    reset_plugin_manager()
    code, out, _ = run(capsys)
    assert code == 0 and "say hello" in out
    code, out, _ = run(capsys, "hello", "--name", "gloo")
    assert (code, out) == (0, "hello gloo\n")


def test_flag_of_a_section_from_an_uninstalled_package_says_what_to_install(capsys) -> None:
    code, _, err = run(capsys, "config", "show", "--rl.group-size", "4")
    assert code == 2
    assert "--rl.group-size: no section [rl] is loaded. It is provided by megatron-rl" in err
