"""A Griffe extension for the documentation build: reST-isms in docstrings read as Markdown.

mcore's docstrings are written for plain-text readers with a little reST: ``double backticks``
(already a Markdown code span), cross-reference roles such as :func:`load_config`, and a
paragraph ending in ``::`` before an indented code block. mkdocstrings renders docstrings as
Markdown (``docstring_style: null`` in ``mkdocs.yml``), so this extension rewrites only what
Markdown would show literally, when Griffe loads the source, leaving the source unchanged:

- ``:role:`target``` (``func``, ``class``, ``mod``, ``meth``, ``attr``, ``data``, ``obj``,
  ``exc``, optionally ``py:``-prefixed) becomes the code span ``target``; ``~a.b.c`` becomes
  ``c``, as Sphinx shows it;
- a line ending in ``text::`` becomes ``text:``, and a line that is only ``::`` is dropped (the
  indented block after it is a Markdown code block already).

``mkdocs.yml`` loads it by path: ``extensions: [tools/docs_griffe.py]``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const)(?::`)([^`]+)`")
_TRAILING_DOUBLE_COLON = re.compile(r"(?m)(\S)::[ \t]*$")
_LONE_DOUBLE_COLON = re.compile(r"(?m)^[ \t]*::[ \t]*\n")


def _role_target(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with reST roles and ``::`` markers turned into Markdown."""
    text = _ROLE.sub(_role_target, text)
    text = _LONE_DOUBLE_COLON.sub("", text)
    return _TRAILING_DOUBLE_COLON.sub(r"\1:", text)


class RstDocstrings(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
