"""API compatibility check: each published package's public API against its last release.

    uv run python tools/api_check.py                 # every package; exit 1 on a break
    uv run python tools/api_check.py -p mcore-core   # one package
    uv run python tools/api_check.py --update-baseline   # after a release, or an agreed break

The baseline of a package is its last release tag (``v*`` for the mcore family,
``megatron-fsdp-v*`` for megatron-fsdp) loaded from git by griffe; where no such tag exists yet,
the committed snapshot ``tools/api-baseline/<package>.json`` (griffe's JSON without docstrings).

A break is one of: a public object removed or changed in kind, a parameter removed, moved
(positional order) or changed in kind, an optional parameter made required, a required
parameter added, a return or attribute type changed, a base class removed. Not breaks: new
objects or optional parameters, changed defaults and constant values (behaviour, not
signature). Skipped: private names (``_x``), test helpers (``tests``, ``testing``), and objects
marked ``@internal_api`` or ``@experimental_api`` (or inside one) in the baseline. An object
marked ``@deprecated(version, removal_version, alternative)`` in the baseline may be removed once
the package's version reaches ``removal_version``; removing it earlier is a break.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import griffe

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "tools" / "api-baseline"

# Published package -> (import name, tag prefix of its releases).
PACKAGES: dict[str, tuple[str, str]] = {
    "mcore-core": ("mcore.core", "v"),
    "mcore-parallel": ("mcore.parallel", "v"),
    "mcore-models": ("mcore.models", "v"),
    "mcore-moe": ("mcore.moe", "v"),
    "mcore-ssm": ("mcore.ssm", "v"),
    "mcore-ckpt": ("mcore.ckpt", "v"),
    "mcore-inference": ("mcore.inference", "v"),
    "mcore-distill": ("mcore.distill", "v"),
    "megatron-rl": ("megatron_rl", "v"),
    "megatron-fsdp": ("megatron_fsdp", "megatron-fsdp-v"),
}

# griffe's breakage kinds that are not breaks here: a changed default or constant value changes
# behaviour, which release notes describe; the signature still accepts every old call.
NOT_BREAKS = {
    griffe.BreakageKind.PARAMETER_CHANGED_DEFAULT,
    griffe.BreakageKind.ATTRIBUTE_CHANGED_VALUE,
}
TEST_MODULES = {"tests", "testing", "conftest"}
SKIP_MARKERS = {"internal_api", "experimental_api"}


@dataclass(frozen=True)
class Break:
    """One incompatible change: where (file:line of the old object), what, and which rule."""

    location: str
    path: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.location}: {self.path}: {self.rule}: {self.detail}"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def package_version(src: Path) -> str:
    """The ``[project] version`` of the package whose ``src`` folder this is."""
    with open(src.parent / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _markers(obj: griffe.Object | griffe.Alias) -> dict[str, str]:
    """Decorator name -> its source text, for this object and every object containing it."""
    found: dict[str, str] = {}
    node: griffe.Object | griffe.Alias | None = obj
    while node is not None:
        if not node.is_alias:
            for decorator in getattr(node, "decorators", ()):
                text = str(decorator.value)
                name = re.split(r"[(\s]", text, maxsplit=1)[0].rsplit(".", 1)[-1]
                found.setdefault(name, text)
        node = node.parent
    return found


def _removal_version(decorator_text: str) -> str | None:
    match = re.search(r"removal_version\s*=\s*['\"]([^'\"]+)['\"]", decorator_text)
    return match.group(1) if match else None


def _skipped_path(path: str) -> bool:
    parts = path.split(".")
    if any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts):
        return True
    return any(p in TEST_MODULES or p.startswith("test_") for p in parts)


def _annotation_changes(old: griffe.Object, new: griffe.Object) -> Iterator[griffe.Breakage]:
    """Changed return and attribute annotations, which griffe leaves unchecked: any change of
    the annotation's text counts (conservative: a widened return type is a break too)."""
    for name, old_member in old.members.items():
        if isinstance(old_member, griffe.Alias) or name not in new.members:
            continue
        new_member = new.members[name]
        if isinstance(new_member, griffe.Alias) or old_member.kind is not new_member.kind:
            continue
        if isinstance(old_member, griffe.Function) and isinstance(new_member, griffe.Function):
            before, after = old_member.returns, new_member.returns
            if before is not None and after is not None and str(before) != str(after):
                yield griffe.ReturnChangedTypeBreakage(new_member, before, after)
        elif isinstance(old_member, griffe.Attribute) and isinstance(new_member, griffe.Attribute):
            before, after = old_member.annotation, new_member.annotation
            if before is not None and str(before) != str(after):
                yield griffe.AttributeChangedTypeBreakage(new_member, before, after)
        elif old_member.is_class or old_member.is_module:
            yield from _annotation_changes(old_member, new_member)


def find_breaks(old: griffe.Object, new: griffe.Object, version: str) -> Iterator[Break]:
    """The breaks of ``new`` against ``old``, after the rules in this module's docstring."""
    seen: set[tuple[str, str]] = set()
    changes = [*griffe.find_breaking_changes(old, new), *_annotation_changes(old, new)]
    for breakage in changes:
        if breakage.kind in NOT_BREAKS:
            continue
        obj = breakage.obj
        path = obj.path
        if (path, breakage.kind.name) in seen:
            continue
        seen.add((path, breakage.kind.name))
        if _skipped_path(path):
            continue
        markers = _markers(obj)
        if SKIP_MARKERS & markers.keys():
            continue
        if breakage.kind is griffe.BreakageKind.OBJECT_REMOVED and "deprecated" in markers:
            removal = _removal_version(markers["deprecated"])
            if removal is not None and _version_tuple(version) >= _version_tuple(removal):
                continue
            detail = f"deprecated, but removed at {version}, before its removal_version {removal}"
            yield Break(_location(obj), path, "object removed before its removal_version", detail)
            continue
        rule = breakage.kind.value
        yield Break(_location(obj), path, rule, _detail(breakage))


def _location(obj: griffe.Object | griffe.Alias) -> str:
    try:
        filepath = obj.filepath
    except Exception:  # an alias to something outside the package
        filepath = None
    name = Path(filepath).as_posix() if isinstance(filepath, (str, Path)) else "?"
    if name.startswith(ROOT.as_posix() + "/"):
        name = name[len(ROOT.as_posix()) + 1 :]
    return f"{name}:{getattr(obj, 'lineno', None) or '?'}"


def _detail(breakage: griffe.Breakage) -> str:
    """The specifics of a break in words: which parameter, what it was and is."""
    kind, old, new = breakage.kind, breakage.old_value, breakage.new_value
    K = griffe.BreakageKind
    if kind.name.startswith("PARAMETER"):
        param = new if kind is K.PARAMETER_ADDED_REQUIRED else old
        text = f"parameter {param.name}"
        if kind is K.PARAMETER_MOVED:
            names = [p.name for p in cast("griffe.Function", breakage.obj).parameters]
            text += f", now at position {names.index(new.name) + 1} of {names}"
        elif kind is K.PARAMETER_CHANGED_KIND:
            text += f", was {old.kind.value}, now {new.kind.value}"
        elif kind is K.PARAMETER_CHANGED_REQUIRED:
            text += ", was optional, now required"
        return text
    if kind in (K.RETURN_CHANGED_TYPE, K.ATTRIBUTE_CHANGED_TYPE):
        return f"was {old}, now {new}"
    if kind is K.OBJECT_CHANGED_KIND:
        return f"was a {old.value}, now a {new.value}"
    if kind is K.CLASS_REMOVED_BASE:
        removed = {str(b) for b in old} - {str(b) for b in new}
        return f"no longer derives from {', '.join(sorted(removed))}"
    return "gone from the public API"


# Baselines ---------------------------------------------------------------------------------


def src_of(package: str, root: Path = ROOT) -> Path:
    return root / "packages" / package / "src"


def load_current(import_name: str, src: Path) -> griffe.Object:
    """The package as its source reads now (static analysis: nothing is imported)."""
    # A package loads as its module (an alias only ever names a member).
    return cast(
        "griffe.Object", griffe.load(import_name, search_paths=[src], allow_inspection=False)
    )


def last_release_tag(prefix: str, repo: Path = ROOT) -> str | None:
    """The newest tag ``<prefix><version>`` in the repository, or None.

    ``v*`` must not pick up ``megatron-fsdp-v*``: the version part has to start with a digit.
    """
    try:
        out = subprocess.run(
            ["git", "tag", "--list", f"{prefix}*"], cwd=repo, capture_output=True, text=True
        ).stdout
    except OSError:
        return None
    tags = [t for t in out.split() if re.fullmatch(re.escape(prefix) + r"\d[\w.\-]*", t)]
    return max(tags, key=lambda t: _version_tuple(t[len(prefix) :]), default=None)


def snapshot(obj: griffe.Object, root: Path = ROOT) -> str:
    """griffe's JSON of ``obj`` without docstrings and with repository-relative paths: the
    committed baseline (small, and the same on every machine)."""
    data = json.loads(obj.as_json())

    def prune(node: object) -> object:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in ("docstring", "analysis"):
                    continue
                if key == "filepath" and isinstance(value, str):
                    value = Path(value).resolve().as_posix().removeprefix(root.as_posix() + "/")
                out[key] = prune(value)
            return out
        if isinstance(node, list):
            return [prune(v) for v in node]
        return node

    return json.dumps(prune(data), separators=(",", ":"), sort_keys=True) + "\n"


def load_snapshot(text: str, import_name: str) -> griffe.Object:
    """A committed snapshot as griffe objects, parented so that paths read ``mcore.core.x``."""
    module = json.loads(text, object_hook=griffe.json_decoder)
    collection = griffe.ModulesCollection()
    top, _, rest = import_name.partition(".")
    if rest:  # a package of the ``mcore`` namespace: hang it under a bare ``mcore`` module
        root = griffe.Module(top)
        root.set_member(rest, module)
    else:
        root = module
    root._modules_collection = collection  # griffe has no public setter for a decoded tree
    collection.set_member(top, root)
    return module


def load_baseline(
    package: str, against: str | None = None, root: Path = ROOT
) -> tuple[griffe.Object, str]:
    """The package's baseline and a description of where it came from."""
    import_name, prefix = PACKAGES[package]
    ref = against or last_release_tag(prefix, root)
    if ref is not None:
        old = griffe.load_git(
            import_name, ref=ref, repo=root, search_paths=[f"packages/{package}/src"],
            allow_inspection=False,
        )  # fmt: skip
        return cast("griffe.Object", old), f"git {ref}"
    path = root / BASELINES.relative_to(ROOT) / f"{package}.json"
    if not path.exists():
        raise SystemExit(
            f"api-check: {package} has no release tag ({prefix}*) and no baseline {path}; "
            "create it with --update-baseline"
        )
    return load_snapshot(path.read_text(), import_name), f"baseline {path.relative_to(root)}"


def check_package(
    package: str, against: str | None = None, root: Path = ROOT
) -> tuple[list[Break], str]:
    """The breaks of one published package against its baseline, and where that came from."""
    import_name, _ = PACKAGES[package]
    src = src_of(package, root)
    old, source = load_baseline(package, against, root)
    new = load_current(import_name, src)
    return list(find_breaks(old, new, package_version(src))), source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="api_check", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "-p", "--package", action="append", choices=sorted(PACKAGES),
        help="check only this package (repeatable); default: every published package",
    )  # fmt: skip
    parser.add_argument(
        "--against", help="compare with this git ref instead of the last release tag / baseline"
    )
    parser.add_argument(
        "--update-baseline", action="store_true",
        help="write tools/api-baseline/<package>.json from the current source and exit",
    )  # fmt: skip
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the repository to check (default: this one)"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    packages = args.package or list(PACKAGES)
    if args.update_baseline:
        folder = root / BASELINES.relative_to(ROOT)
        folder.mkdir(parents=True, exist_ok=True)
        for package in packages:
            obj = load_current(PACKAGES[package][0], src_of(package, root))
            (folder / f"{package}.json").write_text(snapshot(obj, root))
            print(f"api-check: wrote {folder.relative_to(root)}/{package}.json")
        return 0
    total = 0
    for package in packages:
        breaks, source = check_package(package, args.against, root)
        total += len(breaks)
        status = "ok" if not breaks else f"{len(breaks)} break(s)"
        print(f"api-check: {package} against {source}: {status}")
        for b in breaks:
            print(f"  {b}")
    if total:
        print(
            f"api-check: {total} incompatible change(s). Keep the old API (mark it "
            "@deprecated(version, removal_version, alternative)), or, for an agreed break, "
            "refresh the baseline with --update-baseline in the same change.",
            file=sys.stderr,
        )
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
