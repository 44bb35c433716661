"""Markers of API stability: what the compatibility check (``tools/api_check.py``) may skip.

Every public name of a published mcore package is covered by the check unless it is private
(``_name``) or marked here:

- ``@internal_api``: public for technical reasons (used across our own packages), not promised
  to users; may change in any release.
- ``@experimental_api``: new and still settling; may change in any release, and says so.
- ``@deprecated(version, removal_version, alternative)``: still works, warns on every call or
  construction, and may be removed from ``removal_version`` on.

The deprecation timeline, for a package at release N:

1. release N adds ``@deprecated(version="N", removal_version="N+2", alternative=...)``; every
   use warns with a ``DeprecationWarning`` that names the alternative;
2. release N+1 keeps it (still warning), so users on N+1 see the warning for a whole release;
3. release N+2 may remove it. The check refuses a removal of a name that was not deprecated in
   the baseline, or whose ``removal_version`` the package has not reached yet.

The check reads these decorators statically (by name) from the source, so they must be applied
by these names (``from mcore.core.api import deprecated``), not through an alias.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = [
    "Deprecation",
    "api_status",
    "deprecated",
    "experimental_api",
    "internal_api",
]

T = TypeVar("T")

Status = Literal["public", "internal", "experimental", "deprecated"]


@dataclass(frozen=True)
class Deprecation:
    """What ``@deprecated`` recorded on an object (``obj.__mcore_deprecation__``)."""

    name: str
    version: str
    removal_version: str
    alternative: str

    def message(self) -> str:
        """The warning text: what is deprecated, since when, until when, and what to use."""
        return (
            f"{self.name} is deprecated since {self.version} and will be removed in "
            f"{self.removal_version}; use {self.alternative} instead"
        )


def _mark(obj: T, status: Status) -> T:
    obj.__mcore_api__ = status  # type: ignore[attr-defined]
    return obj


def internal_api(obj: T) -> T:
    """Mark a class or function as internal: used across mcore packages, not promised to users."""
    return _mark(obj, "internal")


def experimental_api(obj: T) -> T:
    """Mark a class or function as experimental: it may change in any release."""
    return _mark(obj, "experimental")


def deprecated(*, version: str, removal_version: str, alternative: str) -> Callable[[T], T]:
    """Mark a function or class deprecated: each call or construction warns, naming the alternative.

    ``version`` is the release that deprecated it and ``removal_version`` the first release that
    may remove it (two releases later by the timeline in this module's docstring).
    """
    for field, value in (
        ("version", version),
        ("removal_version", removal_version),
        ("alternative", alternative),
    ):
        if not isinstance(value, str) or not value.strip():
            raise TypeError(f"deprecated({field}=...) must be a non-empty string, got {value!r}")

    def decorate(obj: T) -> T:
        qualname = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
        info = Deprecation(qualname, version, removal_version, alternative)
        if inspect.isclass(obj):
            original_init = obj.__init__

            @functools.wraps(original_init)
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                # Warn for the deprecated class itself, not for subclasses that merely inherit.
                if type(self) is obj:
                    warnings.warn(info.message(), DeprecationWarning, stacklevel=2)
                original_init(self, *args, **kwargs)

            obj.__init__ = __init__  # type: ignore[misc]
            wrapped: Any = obj
        elif callable(obj):

            @functools.wraps(obj)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                warnings.warn(info.message(), DeprecationWarning, stacklevel=2)
                return obj(*args, **kwargs)

            wrapped = wrapper
        else:
            raise TypeError(f"@deprecated applies to functions and classes, not {type(obj)}")
        wrapped.__mcore_api__ = "deprecated"
        wrapped.__mcore_deprecation__ = info
        return wrapped

    return decorate


def api_status(obj: object) -> Status:
    """How ``obj`` is marked: ``public`` unless one of this module's decorators marked it."""
    return getattr(obj, "__mcore_api__", "public")
