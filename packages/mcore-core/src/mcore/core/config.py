"""Run configuration from dataclass sections, a TOML file and ``--section.field`` overrides.

A section is a keyword-only dataclass registered as a ``config_section`` component; the package
that owns the feature owns its section. Each field's docstring (the string literal under it) is
its command-line help. A section may define ``validate(self, errors)`` to check its own fields;
rules that span sections go in the ``mcore_validate_config`` hook. Everything is checked once,
up front, and every problem is reported together, each naming its ``section.field``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import enum
import functools
import inspect
import json
import math
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from mcore.core.errors import ConfigError, McoreError

_MISSING = dataclasses.MISSING
_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}
_DEST_PREFIX = "mcore_cfg:"


def component(kind: str, default: str | None = None, **kwargs: Any) -> Any:
    """A field naming a registry component (``component("router", "topk")``).

    :func:`check_components` resolves such fields, so an unknown name is reported with what
    exists and what to install.
    """
    metadata = {**kwargs.pop("metadata", {}), "registry": kind}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


class ConfigErrors:
    """Collects ``section.field: message`` problems; sections and hooks add, never raise."""

    def __init__(self, prefix: str = "", sink: list[str] | None = None) -> None:
        self._prefix = prefix
        self.messages: list[str] = [] if sink is None else sink

    def add(self, field: str, message: str) -> None:
        """Record a problem with ``field`` (relative to this collector's section, if any)."""
        self.messages.append(f"{self._prefix}{field}: {message}")

    def section(self, name: str) -> ConfigErrors:
        """A collector whose fields are relative to section ``name``."""
        return ConfigErrors(f"{self._prefix}{name}.", self.messages)

    def __bool__(self) -> bool:
        return bool(self.messages)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> help text, from the docstring under each field or ``metadata["help"]``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_aliases(cls: type) -> dict[str, str]:
    """Short names (``metadata["aliases"]``, e.g. ``tp``) -> the field they stand for."""
    return {
        _norm(alias): f.name
        for f in dataclasses.fields(cls)
        for alias in f.metadata.get("aliases", ())
    }


def _field_name(cls: type, key: str) -> str:
    """The field ``key`` names: itself (dashes or underscores) or one of its aliases."""
    name = _norm(key)
    return field_aliases(cls).get(name, name)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


class _Bad(Exception):
    pass


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` (as TOML or Python gives it) against type ``tp``; returns it converted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except _Bad:
                pass
        raise _Bad(f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise _Bad(f"must be one of {choices}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        choices = ", ".join(repr(m.value) for m in tp)
        raise _Bad(f"must be one of {choices}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif origin in (list, tuple, Sequence):
        if isinstance(value, list | tuple):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise _Bad(f"expected {len(args)} items, got {len(value)}")
                items = [coerce(v, a) for v, a in zip(value, args, strict=True)]
            else:
                item_tp = args[0] if args else Any
                items = [coerce(v, item_tp) for v in value]
            return tuple(items) if origin is tuple else items
    elif origin in (dict, Mapping):
        if isinstance(value, dict):
            key_tp, val_tp = args or (Any, Any)
            return {coerce(k, key_tp): coerce(v, val_tp) for k, v in value.items()}
    else:
        raise _Bad(f"fields of type {_type_name(tp)} are not supported in config sections")
    raise _Bad(f"expected {_type_name(tp)}, got {_describe(value)}")


def parse_text(text: str, tp: Any) -> Any:
    """Turn a command-line string into a value of type ``tp`` (then checked by :func:`coerce`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    stripped = text.strip()
    if origin in (Union, types.UnionType):
        if stripped.lower() in _NONE_WORDS and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(parse_text(text, arg), arg)
            except (_Bad, ValueError):
                pass
        raise _Bad(f"expected {_type_name(tp)}, got {text!r}")
    if origin is Literal:
        for a in args:
            if str(a).lower() == stripped.lower() if isinstance(a, bool) else str(a) == stripped:
                return a
        return stripped
    if tp is bool:
        if stripped.lower() in _TRUE_WORDS:
            return True
        if stripped.lower() in _FALSE_WORDS:
            return False
        raise _Bad(f"expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(stripped.replace("_", ""))
        except ValueError:
            raise _Bad(f"expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(stripped)
        except ValueError:
            raise _Bad(f"expected a number, got {text!r}") from None
    if origin in (list, tuple, Sequence, dict, Mapping):
        if stripped.startswith(("[", "{")):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise _Bad(f"could not parse {text!r} as a TOML value: {exc}") from None
        if origin in (dict, Mapping):
            raise _Bad(f"expected an inline table like {{key = 1}}, got {text!r}")
        item_tp = args[0] if args else str
        return [parse_text(part, item_tp) for part in stripped.split(",") if part.strip()]
    return text


class Config:
    """A resolved run configuration: one dataclass instance per section, by attribute."""

    def __init__(self, sections: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_sections", dict(sections))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(
                f"config has no section {name!r}; sections: {', '.join(self._sections)}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config sections are fixed; set fields on a section instead")

    def __getitem__(self, name: str) -> Any:
        return self._sections[name]

    def __contains__(self, name: object) -> bool:
        return name in self._sections

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._sections == other._sections

    def __repr__(self) -> str:
        return f"Config({', '.join(self._sections)})"

    def section_names(self) -> list[str]:
        """The section names, in order."""
        return list(self._sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain ``{section: {field: value}}``, JSON-ready (enums by value, paths as strings)."""
        return {
            name: {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            for name, obj in self._sections.items()
        }

    def to_toml(self) -> str:
        """The config as a TOML document that :func:`load_config` reads back to an equal config."""
        out: list[str] = []
        for name, values in self.to_dict().items():
            out.append(f"[{name}]")
            for key, value in values.items():
                if value is None:
                    out.append(f"# {key} = (unset)")
                else:
                    out.append(f"{key} = {_toml_value(value)}")
            out.append("")
        return "\n".join(out)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise McoreError(f"cannot write {value!r} as TOML")


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _build_section(
    name: str, cls: type, values: Mapping[str, Any], errors: ConfigErrors
) -> Any | None:
    """The section instance from ``values``; a field that fails its type check is reported and
    left at its default, so the section's own validation still runs on the rest."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        field_name = _field_name(cls, key)
        if field_name not in fields:
            close = difflib.get_close_matches(field_name, list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            errors.add(f"{name}.{key}", f"unknown field of section [{name}].{hint}")
            continue
        try:
            kwargs[field_name] = coerce(value, hints[field_name])
        except _Bad as exc:
            errors.add(f"{name}.{field_name}", str(exc))
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING
    ]
    for field_name in missing:
        errors.add(f"{name}.{field_name}", "is required and has no default")
    if missing:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.add(name, f"{type(exc).__name__}: {exc}")
        return None


def build_config(
    values: Mapping[str, Mapping[str, Any]],
    sections: Mapping[str, type],
    *,
    errors: ConfigErrors | None = None,
    unknown_section_hint: typing.Callable[[str], str] | None = None,
    validate_hook: typing.Callable[[Config, ConfigErrors], None] | None = None,
) -> Config:
    """Build and validate a :class:`Config` from ``{section: {field: value}}``.

    Problems already in ``errors`` (say, from parsing overrides) are reported with the rest.
    Raises :class:`ConfigError` listing every problem found.
    """
    errors = ConfigErrors() if errors is None else errors
    by_norm = {_norm(n): n for n in sections}
    given: dict[str, Mapping[str, Any]] = {}
    for key, table in values.items():
        name = by_norm.get(_norm(key))
        if name is None:
            close = difflib.get_close_matches(_norm(key), list(by_norm), n=1)
            hint = f" Did you mean [{by_norm[close[0]]}]?" if close else ""
            if unknown_section_hint:
                hint += " " + unknown_section_hint(key)
            errors.add(key, f"unknown config section. Sections: {', '.join(sections)}.{hint}")
            continue
        if not isinstance(table, Mapping):
            errors.add(key, f"must be a table ([{name}]), got {_describe(table)}")
            continue
        given[name] = {**given.get(name, {}), **table}
    built = {n: _build_section(n, cls, given.get(n, {}), errors) for n, cls in sections.items()}
    for name, obj in built.items():
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate(errors.section(name))
    config = Config(built)
    if not errors and validate_hook is not None:
        validate_hook(config, errors)
    if errors:
        raise ConfigError(errors.messages)
    return config


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; errors name the file."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise McoreError(f"config file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise McoreError(f"config file {str(p)!r} is not valid TOML: {exc}") from None


def parse_overrides(
    overrides: Mapping[str, str] | Iterable[str],
    sections: Mapping[str, type],
    errors: ConfigErrors | None = None,
) -> dict[str, dict[str, Any]]:
    """``{"section.field": "text"}`` (or ``["section.field=text", ...]``) to typed values.

    A value that does not parse is left out and reported into ``errors``; without a collector,
    :class:`ConfigError` is raised naming each such override.
    """
    raise_now = errors is None
    if not isinstance(overrides, Mapping):
        pairs: dict[str, str] = {}
        for item in overrides:
            key, sep, text = item.removeprefix("--").partition("=")
            if not sep:
                raise ConfigError([f"{item}: override must look like section.field=value"])
            pairs[key] = text
        overrides = pairs
    errors = ConfigErrors() if errors is None else errors
    by_norm = {_norm(n): n for n in sections}
    out: dict[str, dict[str, Any]] = {}
    for key, text in overrides.items():
        section_key, dot, field_key = key.partition(".")
        name = by_norm.get(_norm(section_key))
        if not dot or name is None:
            out.setdefault(section_key, {})[field_key] = text  # build_config reports it
            continue
        field_name = _field_name(sections[name], field_key)
        tp = _hints(sections[name]).get(field_name)
        if tp is None:
            out.setdefault(name, {})[field_key] = text
            continue
        try:
            out.setdefault(name, {})[field_name] = parse_text(text, tp)
        except _Bad as exc:
            errors.add(f"{name}.{field_name}", str(exc))
    if raise_now and errors:
        raise ConfigError(errors.messages)
    return out


def merge(
    base: Mapping[str, Mapping[str, Any]], top: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Section-wise merge: fields in ``top`` replace those in ``base``."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, table in top.items():
        current = out.get(section)
        out[section] = {**current, **table} if isinstance(current, dict) else dict(table)
    return out


def check_components(
    config: Config, registries: Any, *, skip_empty_kinds: bool = False
) -> list[str]:
    """Resolve every field declared with :func:`component`; returns a message per unknown name.

    ``skip_empty_kinds`` leaves out kinds nothing is registered for yet (a default that names a
    feature no installed package provides, which the run may never use).
    """
    problems: list[str] = []
    for name in config.section_names():
        section = config[name]
        for f in dataclasses.fields(section):
            kind = f.metadata.get("registry")
            value = getattr(section, f.name)
            if kind is None or value is None:
                continue
            if skip_empty_kinds and not registries[kind].components():
                continue
            try:
                registries[kind].component(value)
            except McoreError as exc:
                problems.append(f"{name}.{f.name}: {exc}")
    return problems


# Sections print in this order; sections of other plugins follow alphabetically.
SECTION_ORDER = [
    "model",
    "parallel",
    "train",
    "optimizer",
    "data",
    "checkpoint",
    "logger",
    "straggler",
    "profile",
    "moe",
    "fsdp",
    "inference",
    "rl",
]


def config_sections(manager: Any = None) -> dict[str, type]:
    """``{name: dataclass}`` of every config section the loaded plugins registered."""
    if manager is None:
        from mcore.core.plugins import get_plugin_manager

        manager = get_plugin_manager()
    registry = manager.registries["config_section"]
    rank = {n: i for i, n in enumerate(SECTION_ORDER)}
    names = sorted(registry.names(), key=lambda n: (rank.get(n, len(rank)), n))
    return {n: registry.get(n) for n in names}


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, str] | Iterable[str] = (),
    *,
    manager: Any = None,
) -> Config:
    """The run config: section defaults, then the TOML file at ``path``, then ``overrides``.

    ``overrides`` maps ``"section.field"`` to command-line text (or is a list of
    ``"section.field=text"``). Raises :class:`ConfigError` listing every problem.
    """
    if manager is None:
        from mcore.core.plugins import get_plugin_manager

        manager = get_plugin_manager()
    sections = config_sections(manager)
    values = read_toml(path) if path is not None else {}
    errors = ConfigErrors()
    values = merge(values, parse_overrides(overrides, sections, errors))
    return build_config(
        values,
        sections,
        errors=errors,
        unknown_section_hint=lambda name: manager.missing_hint("config_section", name) or "",
        validate_hook=lambda cfg, errs: manager.hook.mcore_validate_config(config=cfg, errors=errs),
    )


# --- command line ------------------------------------------------------------------------------


def _flag(section: str, field_name: str) -> str:
    return f"--{section}.{field_name.replace('_', '-')}"


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """Accept ``--section.field_name`` as well as ``--section.field-name``."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, sep, value = arg.partition("=")
            arg = key.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _metavar(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _metavar(inner[0]) if len(inner) == 1 else "VALUE"
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + ",".join(str(m.value) for m in tp) + "}"
    if origin in (list, tuple, Sequence):
        return "A,B,..."
    if origin in (dict, Mapping):
        return "{K=V}"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}.get(tp, "VALUE")


def add_config_arguments(
    parser: argparse.ArgumentParser, sections: Mapping[str, type], owners: Mapping[str, str]
) -> None:
    """Add ``--section.field VALUE`` for every field, grouped by section, with help text."""
    for name, cls in sections.items():
        owner = owners.get(name)
        title = f"[{name}] section" + (f" (from {owner})" if owner else "")
        group = parser.add_argument_group(title, (inspect.getdoc(cls) or "").split("\n")[0])
        docs = field_docs(cls)
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = hints[f.name]
            default = f.default if f.default is not _MISSING else None
            if f.default_factory is not _MISSING:
                default = f.default_factory()
            help_text = docs.get(f.name, "")
            help_text += f" (default: {_plain(default)!r})" if default is not None else ""
            group.add_argument(
                _flag(name, f.name),
                *(_flag(name, alias) for alias in f.metadata.get("aliases", ())),
                dest=f"{_DEST_PREFIX}{name}.{f.name}",
                metavar=_metavar(tp),
                default=argparse.SUPPRESS,
                help=help_text.replace("%", "%%"),
                **(_BOOL_FLAG if tp is bool else {}),
            )


# A bool flag given alone means true: `--train.fp16` as well as `--train.fp16 false`.
_BOOL_FLAG: dict[str, Any] = {"nargs": "?", "const": "true"}


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The ``{"section.field": text}`` overrides given on a command line parsed as above."""
    return {
        key.removeprefix(_DEST_PREFIX): value
        for key, value in vars(args).items()
        if key.startswith(_DEST_PREFIX)
    }
