"""The documentation site (mkdocs.yml, docs/): it builds strictly, its generated Megatron-LM flag
table is real, and the code on its pages runs.

Code blocks of docs/**/*.md:

- every ```python block runs: the blocks of one page in order, in one fresh module namespace per
  page, all pages in one child process (torch is imported once; the pages' plugins and process
  groups never touch this test process);
- in ```bash blocks, each line starting with ``mcore `` runs (with this environment's ``mcore``)
  and must exit 0; other lines (``uv run ...``, ``pip install ...``) never run;
- a block right below a line ``<!-- docs-test: skip -->`` does not run (long training, servers).

Budget: the whole file must stay under a minute on a 2-core machine (each ``mcore`` process
can cost seconds of imports), so runnable commands and skipped blocks are kept few.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
SKIP_MARKER = "<!-- docs-test: skip -->"
MAX_MCORE_COMMANDS = 6  # a command that imports torch costs ~5 s on the 2-core box
MAX_SKIPPED_BLOCKS = 6


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


docs_hooks = _load("docs_hooks")
docs_griffe = _load("docs_griffe")


@dataclass(frozen=True)
class Block:
    page: str  # relative to docs/
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: bool


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their language and skip marker."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        start, body = i, []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence)
            and set(lines[i].strip()) == {fence[0]}
            and len(lines[i].strip()) >= len(fence)
        ):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        skip = start > 0 and lines[start - 1].strip() == SKIP_MARKER
        code = textwrap.dedent("\n".join(body))
        page = str(path.relative_to(DOCS))
        blocks.append(Block(page, start + 1, m.group("lang").lower(), code, skip))
    return blocks


def all_blocks() -> list[Block]:
    return [b for page in sorted(DOCS.rglob("*.md")) for b in code_blocks(page)]


def mcore_commands(block: Block) -> list[list[str]]:
    """The ``mcore ...`` command lines of a bash block (continuation lines joined)."""
    joined = block.code.replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)
        for line in joined.split("\n")
        if line.strip().startswith("mcore ")
    ]


# --- the site builds -------------------------------------------------------------------------


def test_the_site_builds_strictly_with_a_real_flag_table(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    migrating = (site / "migrating" / "index.html").read_text()
    assert docs_hooks.MARKER not in migrating
    row = re.search(
        r"<td><code>--tensor-model-parallel-size</code></td>\s*"
        r"<td><code>--parallel\.tensor-model-parallel-size</code> \(<code>--parallel\.tp</code>\)",
        migrating,
    )
    assert row, "the flag table has no --tensor-model-parallel-size row"
    assert migrating.count("<tr>") > 100  # the flag tables' rows (and the defaults table's)
    plugins = (site / "concepts" / "plugins" / "index.html").read_text()
    assert "<code>mcore_loss_terms(trainer, model, batch, lm_loss)</code>" in plugins
    assert "<code>config_section</code>" in plugins
    # the API reference is generated from the docstrings, reST roles turned into Markdown
    core = (site / "reference" / "mcore-core" / "index.html").read_text()
    assert 'id="mcore.core.config.config_sections"' in core
    assert ":func:" not in core and ":class:" not in core


def test_the_flag_table_maps_megatron_flags_to_mcore_cli_flags():
    from mcore.core import get_plugin_manager
    from mcore.core.config import add_config_arguments, config_sections, normalize_flags

    rows = docs_hooks.megatron_flag_rows()
    by_flag = {}
    for row in rows:
        by_flag.setdefault(row.megatron, []).append(row)
    tp = by_flag["--tensor-model-parallel-size"][0]
    assert (tp.section, tp.field) == ("parallel", "tensor_model_parallel_size")
    assert tp.mcore == "--parallel.tensor-model-parallel-size"
    assert tp.aliases == ("--parallel.tp",)
    assert tp.plugin == "mcore-parallel"
    assert tp.help.startswith("Ranks that split each layer's weights")
    expected = {
        "--num-layers": "--model.num-layers",
        "--hidden-size": "--model.hidden-size",
        "--micro-batch-size": "--train.micro-batch-size",
        "--seq-length": "--train.seq-length",
        "--train-iters": "--train.train-iters",
        "--lr": "--optimizer.lr",
        "--save": "--checkpoint.save",
        "--load": "--checkpoint.load",
        "--num-experts": "--moe.num-experts",
        "--moe-router-topk": "--moe.router-topk",
        "--expert-model-parallel-size": "--parallel.expert-model-parallel-size",
        "--recompute-granularity": "--model.recompute-granularity",
        "--grpo-group-size": "--rl.group-size",
    }
    for megatron, mcore in expected.items():
        assert [r.mcore for r in by_flag[megatron]] == [mcore], megatron
    assert len(by_flag) >= 100

    # Every row is a flag the mcore CLI takes, with help, and a well-formed Megatron-LM flag.
    import argparse

    parser = argparse.ArgumentParser()
    manager = get_plugin_manager()
    owners = {c.name: c.plugin for c in manager.registries["config_section"].components()}
    add_config_arguments(parser, config_sections(manager), owners)
    for row in rows:
        assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", row.megatron), row
        assert row.mcore in parser._option_string_actions, row
        assert row.help, row

    table = docs_hooks.megatron_flag_table(rows)
    assert "### `[parallel]` (mcore-parallel)" in table
    assert (
        "| `--tensor-model-parallel-size` | `--parallel.tensor-model-parallel-size` "
        "(`--parallel.tp`) | Ranks that split each layer's weights (TP). |"
    ) in table
    assert table.count("\n| `--") == len(rows)
    # the CLI also takes the underscore spelling of the same flag
    assert normalize_flags(["--parallel.tensor_model_parallel_size=2"]) == [
        "--parallel.tensor-model-parallel-size=2"
    ]


def test_reST_roles_in_docstrings_become_markdown():
    text = (
        "See :func:`load_config` and :class:`~mcore.core.config.Config`, or "
        ":py:meth:`Registry.get`. The API in one screen::\n\n    code\n\n::\n\n    more\n"
    )
    assert docs_griffe.rst_to_markdown(text) == (
        "See `load_config` and `Config`, or `Registry.get`. The API in one screen:\n\n"
        "    code\n\n\n    more\n"
    )


# --- the code on the pages runs --------------------------------------------------------------

_RUNNER = r"""
import json, sys, traceback, types

pages = json.load(open(sys.argv[1]))
results = []
for n, (page, blocks) in enumerate(pages.items()):
    module = types.ModuleType(f"docs_page_{n}")
    module.__file__ = page
    sys.modules[module.__name__] = module
    for line, code in blocks:
        try:
            exec(compile(code, f"docs/{page}:{line}", "exec"), module.__dict__)
        except BaseException:
            results.append({"page": page, "line": line, "error": traceback.format_exc()})
            break  # later blocks of the page build on this one
print("DOCS-RESULTS " + json.dumps(results))
"""


def test_the_python_blocks_of_every_page_run(tmp_path):
    pages: dict[str, list[tuple[int, str]]] = {}
    for block in all_blocks():
        if block.lang in ("python", "py") and not block.skip:
            pages.setdefault(block.page, []).append((block.line, block.code))
    assert sum(len(b) for b in pages.values()) >= 5, "the pages lost their Python examples"
    spec = tmp_path / "pages.json"
    spec.write_text(json.dumps(pages))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(spec)],
        cwd=tmp_path,  # whatever an example writes lands here
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = [line for line in proc.stdout.splitlines() if line.startswith("DOCS-RESULTS ")]
    assert proc.returncode == 0 and out, proc.stdout[-3000:] + proc.stderr[-3000:]
    failures = json.loads(out[-1].removeprefix("DOCS-RESULTS "))
    assert not failures, "\n".join(f"docs/{f['page']}:{f['line']}\n{f['error']}" for f in failures)


def test_the_mcore_commands_of_the_pages_run(tmp_path):
    commands = [
        (block, argv)
        for block in all_blocks()
        if block.lang in ("bash", "sh", "shell", "console") and not block.skip
        for argv in mcore_commands(block)
    ]
    assert commands, "no page shows a runnable mcore command"
    assert len(commands) <= MAX_MCORE_COMMANDS, (
        f"{len(commands)} runnable mcore commands in the docs; each costs seconds in this "
        f"test: keep at most {MAX_MCORE_COMMANDS} (mark others with {SKIP_MARKER})"
    )

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "mcore"), *argv[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(run, [argv for _, argv in commands]))
    for (block, argv), proc in zip(commands, procs, strict=True):
        assert proc.returncode == 0, (
            f"docs/{block.page}:{block.line}: `{shlex.join(argv)}` exited {proc.returncode}\n"
            + proc.stdout[-2000:]
            + proc.stderr[-2000:]
        )
        assert proc.stdout.strip(), f"docs/{block.page}:{block.line}: `{shlex.join(argv)}`"


def test_blocks_that_do_not_run_are_few_and_marked_on_purpose():
    blocks = all_blocks()
    skipped = [b for b in blocks if b.skip]
    assert len(skipped) <= MAX_SKIPPED_BLOCKS, [f"{b.page}:{b.line}" for b in skipped]
    for block in skipped:  # a marker on a block that would not run anyway is a mistake
        runs = block.lang in ("python", "py") or (
            block.lang in ("bash", "sh", "shell", "console") and mcore_commands(block)
        )
        assert runs, f"docs/{block.page}:{block.line}: {SKIP_MARKER} on a block that never runs"
    for page in DOCS.rglob("*.md"):  # a marker must sit right above a fence
        lines = page.read_text().split("\n")
        for i, line in enumerate(lines):
            if line.strip() == SKIP_MARKER:
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                where = f"{page.relative_to(ROOT)}:{i + 1}"
                assert _FENCE.match(nxt), f"{where}: {SKIP_MARKER} is not right above a fence"
