"""MkDocs hooks of the documentation site (``hooks:`` in ``mkdocs.yml``): tables made from code.

A page line holding only a marker is replaced, at build time, by a table read from the code:

- ``<!-- megatron-flag-table -->``: Megatron-LM flags and the mcore fields they correspond to;
- ``<!-- hook-specs-table -->``: the hooks of ``mcore.core.hookspecs``, with their arguments;
- ``<!-- registry-kinds-table -->``: the registry kinds of ``mcore.core.registry.KINDS``.

The Megatron-LM flag table of ``docs/migrating.md`` is generated here, at build time, from the
config sections themselves: a page line holding only ``<!-- megatron-flag-table -->`` is replaced
by one row per config field whose ``metadata`` names a Megatron-LM flag
(``field(..., metadata={"megatron": "--tensor-model-parallel-size"})``), giving the flag, the
``mcore`` flag that sets the field (``--section.field-name`` and its short aliases), the plugin
that owns the section and the field's help (the docstring under it). Sections come from
:func:`mcore.core.config.config_sections`, so every installed plugin's fields appear. A page
with a marker but no row to fill it fails the build.

``tools/tests/test_docs.py`` imports :func:`megatron_flag_rows` and :func:`megatron_flag_table`.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import re
from dataclasses import dataclass
from typing import Any

MARKER = "<!-- megatron-flag-table -->"
HOOKS_MARKER = "<!-- hook-specs-table -->"
KINDS_MARKER = "<!-- registry-kinds-table -->"
METADATA_KEY = "megatron"


@dataclass(frozen=True)
class FlagRow:
    """One Megatron-LM flag and the mcore config field it corresponds to."""

    megatron: str
    """The Megatron-LM flag, e.g. ``--tensor-model-parallel-size``."""
    section: str
    field: str
    mcore: str
    """How the ``mcore`` CLI spells the field, e.g. ``--parallel.tensor-model-parallel-size``."""
    aliases: tuple[str, ...]
    """Short spellings of the same flag (``--parallel.tp``)."""
    plugin: str
    """The plugin (entry point) that registered the section."""
    help: str


def _cli_flag(section: str, name: str) -> str:
    # as mcore.core.config.add_config_arguments spells it
    return f"--{section}.{name.replace('_', '-')}"


def megatron_flag_rows(manager: Any = None) -> list[FlagRow]:
    """Every config field with a ``"megatron"`` metadata entry, in section and field order."""
    from mcore.core import get_plugin_manager
    from mcore.core.config import config_sections, field_docs

    manager = manager or get_plugin_manager()
    owners = {c.name: c.plugin for c in manager.registries["config_section"].components()}
    rows = []
    for section, cls in config_sections(manager).items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get(METADATA_KEY)
            if flag is None:
                continue
            if not (isinstance(flag, str) and flag.startswith("--")):
                raise ValueError(
                    f"{cls.__qualname__}.{f.name}: metadata[{METADATA_KEY!r}] must be a "
                    f"Megatron-LM flag like '--num-layers', got {flag!r}"
                )
            rows.append(
                FlagRow(
                    megatron=flag,
                    section=section,
                    field=f.name,
                    mcore=_cli_flag(section, f.name),
                    aliases=tuple(_cli_flag(section, a) for a in f.metadata.get("aliases", ())),
                    plugin=owners.get(section, "?"),
                    help=docs.get(f.name, ""),
                )
            )
    return rows


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no raw ``|`` or HTML."""
    text = re.sub(r"\s+", " ", text).strip()
    return html.escape(text, quote=False).replace("|", "\\|").replace("*", "\\*")


def megatron_flag_table(rows: list[FlagRow] | None = None) -> str:
    """The Markdown tables, one per config section: Megatron-LM flag, mcore flag, help."""
    rows = megatron_flag_rows() if rows is None else rows
    lines: list[str] = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += [
                "",
                f"### `[{section}]` ({row.plugin})",
                "",
                "| Megatron-LM | mcore | what it sets |",
                "|---|---|---|",
            ]
        mcore = f"`{row.mcore}`" + "".join(f" (`{a}`)" for a in row.aliases)
        lines.append(f"| `{row.megatron}` | {mcore} | {_cell(row.help)} |")
    flags = len({row.megatron for row in rows})
    sections = len({row.section for row in rows})
    lines += ["", f"{flags} Megatron-LM flags map to {len(rows)} fields of {sections} sections."]
    return "\n".join(lines).lstrip("\n")


def hook_specs_table() -> str:
    """The hooks a plugin may implement: name and arguments, how results combine, summary."""
    from mcore.core import hookspecs

    lines = ["| hook | results | what it is for |", "|---|---|---|"]
    for name, func in vars(hookspecs).items():
        spec = getattr(func, f"{hookspecs.PROJECT}_spec", None)
        if not name.startswith("mcore_") or spec is None:
            continue
        args = ", ".join(inspect.signature(func).parameters)
        results = "first non-`None`" if spec.get("firstresult") else "all"
        summary = (inspect.getdoc(func) or "").split("\n\n")[0]
        lines.append(f"| `{name}({args})` | {results} | {_cell(summary)} |")
    return "\n".join(lines)


def registry_kinds_table() -> str:
    """The registry kinds: name, what they hold, the usual provider, what an entry must be."""
    from mcore.core.registry import KINDS

    lines = ["| kind | holds | usual provider | an entry is |", "|---|---|---|---|"]
    for kind in KINDS.values():
        lines.append(
            f"| `{kind.name}` | {_cell(kind.description)} | {kind.provider} | {kind.expects} |"
        )
    return "\n".join(lines)


def _fill(markdown: str, marker: str, table: Any) -> str:
    """``markdown`` with each line that holds only ``marker`` replaced by ``table()``."""
    lines = markdown.split("\n")
    if marker not in (line.strip() for line in lines):
        return markdown
    text = table()
    return "\n".join(text if line.strip() == marker else line for line in lines)


def _flag_table_or_fail(page: Any) -> str:
    from mkdocs.exceptions import PluginError

    rows = megatron_flag_rows()
    if not rows:
        raise PluginError(
            f"{page.file.src_path}: no config field carries metadata[{METADATA_KEY!r}], so the "
            "Megatron-LM flag table would be empty"
        )
    return megatron_flag_table(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: replace the table markers of a page with their tables."""
    markdown = _fill(markdown, MARKER, lambda: _flag_table_or_fail(page))
    markdown = _fill(markdown, HOOKS_MARKER, hook_specs_table)
    return _fill(markdown, KINDS_MARKER, registry_kinds_table)
