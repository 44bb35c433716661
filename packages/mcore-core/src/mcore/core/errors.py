"""Errors a user can act on: each names what was wrong, the value seen and what to do."""

from __future__ import annotations


class McoreError(Exception):
    """Base of every error mcore raises on purpose; the CLI prints these without a traceback."""


class UnknownComponentError(McoreError, LookupError):
    """A registry lookup named a component that no loaded plugin provides."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name


class DuplicateComponentError(McoreError, ValueError):
    """Two plugins claimed the same name in one registry and neither asked to override."""


class PluginError(McoreError):
    """A plugin could not be loaded or registered."""


class ConfigError(McoreError, ValueError):
    """The configuration is invalid; ``errors`` holds one ``"section.field: problem"`` per line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        noun = "error" if len(self.errors) == 1 else "errors"
        lines = [f"invalid configuration ({len(self.errors)} {noun}):"]
        lines += [f"  {e}" for e in self.errors]
        super().__init__("\n".join(lines))
