"""Package exports resolved on first use (PEP 562), so importing a package stays cheap.

The plugin loader imports each package's plugin module, which imports the package itself; with
lazy exports that does not pull in torch, and ``mcore plugins`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for package ``package`` whose names live in submodules.

    ``exports`` maps each public name to the module defining it. Use in ``__init__.py``::

        __getattr__, __dir__ = lazy_exports(__name__, {"GPTModel": "mcore.models.gpt"})
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this hook
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
