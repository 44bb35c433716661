"""Typed registries of named components that plugins contribute.

Each kind (``router``, ``model``, ``checkpoint_format``, ...) has its own :class:`Registry`.
Plugins add to them through a :class:`PluginRegistrar`, which records who added what so that
``mcore plugins`` can show it and a duplicate can name both claimants.

A kind whose components have a typed interface names its ``typing.Protocol`` by import path
(:attr:`Kind.protocol`), in the package that owns the kind: the core never imports it itself,
so it stays free of the other mcore packages, and an entry missing a member of the protocol is
refused with the members it lacks.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mcore.core.errors import DuplicateComponentError, McoreError, UnknownComponentError


@dataclass(frozen=True)
class CliCommand:
    """An ``mcore`` sub-command: ``configure`` adds its arguments, ``run`` returns an exit code."""

    help: str
    configure: Callable[[Any], None]
    run: Callable[[Any], int | None]


def _is_dataclass_type(obj: Any) -> bool:
    return isinstance(obj, type) and dataclasses.is_dataclass(obj)


def _is_cli_command(obj: Any) -> bool:
    return isinstance(obj, CliCommand)


@dataclass(frozen=True)
class Kind:
    """What a registry holds: a one-line description, a check on its entries and a home package."""

    name: str
    description: str
    provider: str
    check: Callable[[Any], bool] = callable
    expects: str = "a callable (class or factory)"
    label: str = ""
    """How messages name one entry; defaults to the kind with spaces ("token dispatcher")."""
    protocol: str = ""
    """The ``typing.Protocol`` this kind's components satisfy, as ``"module:Name"`` in the
    package that owns the kind; imported on first check (and not checked when that package is
    not installed, since nothing could then use the components)."""
    builds: bool = True
    """Entries build the component (a class, or a factory called with the owning package's
    arguments) rather than being it. A class must have the protocol's methods and class
    variables; a factory's product is checked when :meth:`Registry.build` calls it."""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " "))

    def missing_members(self, obj: Any) -> list[str]:
        """The members of :attr:`protocol` that entry ``obj`` lacks (empty: it conforms)."""
        protocol = _protocol(self.protocol) if self.protocol else None
        if protocol is None:
            return []
        if self.builds and isinstance(obj, type):
            return [m for m in _class_members(protocol) if not _class_has(obj, m)]
        if self.builds and callable(obj) and not isinstance(obj, type):
            return []  # a factory: what it builds is checked by Registry.build
        return missing_members(protocol, obj)


def missing_members(protocol: type, obj: object) -> list[str]:
    """The members of ``protocol`` that object ``obj`` lacks (empty: it conforms)."""
    return [m for m in _members(protocol) if not hasattr(obj, m)]


@functools.cache
def _protocol(target: str) -> type | None:
    try:
        return _import_target(target)
    except McoreError:
        return None  # the owning package is not installed: nothing can use the entries


@functools.cache
def _members(protocol: type) -> tuple[str, ...]:
    """Public attributes and methods of ``protocol`` (and ``__call__``), its bases' included."""
    names: dict[str, None] = {}
    for base in reversed(protocol.__mro__):
        if base is object or base.__module__ == "typing":
            continue
        for name in [*_annotations(base), *vars(base)]:
            if not name.startswith("_") or name == "__call__":
                names[name] = None
    return tuple(names)


@functools.cache
def _class_members(protocol: type) -> tuple[str, ...]:
    """The members of ``protocol`` that a class implementing it holds itself: methods and
    ``ClassVar`` attributes (instance attributes appear only once it is built)."""
    out = []
    for name in _members(protocol):
        owner = next(b for b in protocol.__mro__ if name in vars(b) or name in _annotations(b))
        value = vars(owner).get(name)
        method = inspect.isroutine(value) or isinstance(value, (classmethod, staticmethod))
        annotation = str(_annotations(owner).get(name, ""))
        if method or annotation.startswith(("ClassVar", "typing.ClassVar")):
            out.append(name)
    return tuple(out)


def _annotations(cls: type) -> dict[str, Any]:
    return vars(cls).get("__annotations__", {})


def _class_has(cls: type, name: str) -> bool:
    # Looked up in the class's own hierarchy, not through its metaclass (every class is
    # callable through ``type.__call__``; its instances are only if the class defines one).
    return any(name in vars(c) for c in inspect.getmro(cls))


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind(
            "router",
            "MoE routers: score tokens and pick experts",
            "mcore-moe",
            protocol="mcore.moe.protocols:Router",
        ),
        Kind(
            "token_dispatcher",
            "MoE token dispatchers: move tokens to experts",
            "mcore-moe",
            protocol="mcore.moe.protocols:TokenDispatcher",
        ),
        Kind(
            "flex_backend",
            "backends of the flex token dispatcher",
            "mcore-moe",
            protocol="mcore.moe.protocols:FlexBackend",
        ),
        Kind("mlp", "MLP blocks of a transformer layer", "mcore-models"),
        Kind("norm", "normalisation layers", "mcore-models"),
        Kind("attention", "attention modules of a transformer layer", "mcore-models"),
        Kind(
            "mixer",
            "sequence mixers of hybrid layers (Mamba-2, gated delta net)",
            "mcore-models",
        ),
        Kind("layer", "transformer layer types, by layer-pattern symbol", "mcore-models"),
        Kind("model", "model builders", "mcore-models"),
        Kind("attention_backend", "attention kernels", "mcore-models"),
        Kind("linear_backend", "linear layer implementations", "mcore-parallel"),
        Kind(
            "data_parallel",
            "data-parallel wrappers",
            "mcore-parallel",
            protocol="mcore.parallel.protocols:DataParallelWrapper",
        ),
        Kind("optimizer", "optimizer builders", "mcore-parallel"),
        Kind(
            "checkpoint_format",
            "checkpoint formats",
            "mcore-ckpt",
            check=lambda obj: obj is not None,
            expects="a checkpoint format object",
            protocol="mcore.ckpt.protocols:CheckpointFormat",
            builds=False,
        ),
        Kind(
            "hf_architecture",
            "Hugging Face architectures and their weight mappings",
            "mcore-models",
            check=lambda obj: obj is not None,
            expects="an architecture mapping object",
            label="Hugging Face architecture",
        ),
        Kind("dataset", "training datasets", "mcore-core"),
        Kind("tokenizer", "tokenizers", "mcore-core"),
        Kind(
            "rl_env",
            "RL environments",
            "megatron-rl",
            protocol="megatron_rl.envs.base:Environment",
        ),
        Kind(
            "rl_agent",
            "RL agents",
            "megatron-rl",
            protocol="megatron_rl.agents:Agent",
        ),
        Kind(
            "cli_command",
            "sub-commands of the mcore CLI",
            "mcore-core",
            check=_is_cli_command,
            expects="a mcore.core.CliCommand",
            label="command",
        ),
        Kind(
            "config_section",
            "configuration sections",
            "mcore-core",
            check=_is_dataclass_type,
            expects="a dataclass type",
        ),
    ]
}

# Names that a known package provides, so a lookup can say what to install. Only for names
# whose home differs from the kind's own provider above.
KNOWN_PROVIDERS: dict[tuple[str, str], str] = {
    ("data_parallel", "megatron_fsdp"): "megatron-fsdp",
    ("checkpoint_format", "fsdp_dtensor"): "mcore-ckpt",
    ("flex_backend", "deepep"): "mcore-moe",
    ("flex_backend", "hybridep"): "mcore-moe",
    ("attention_backend", "te"): "mcore-models[te]",
    ("linear_backend", "onednn_packed"): "mcore-inference",
    ("mlp", "moe"): "mcore-moe",
    ("hf_architecture", "DeepseekV3ForCausalLM"): "mcore-moe",
    ("hf_architecture", "Qwen3MoeForCausalLM"): "mcore-moe",
    ("hf_architecture", "MixtralForCausalLM"): "mcore-moe",
    ("hf_architecture", "Qwen2MoeForCausalLM"): "mcore-moe",
    ("layer", "E"): "mcore-moe",
    ("layer", "M"): "mcore-ssm",
    ("layer", "G"): "mcore-ssm",
    ("mixer", "mamba"): "mcore-ssm",
    ("mixer", "gated_delta_net"): "mcore-ssm",
    ("hf_architecture", "NemotronHForCausalLM"): "mcore-ssm",
    ("hf_architecture", "Qwen3NextForCausalLM"): "mcore-ssm",
    ("config_section", "ssm"): "mcore-ssm",
    ("config_section", "parallel"): "mcore-parallel",
    ("config_section", "model"): "mcore-models",
    ("config_section", "moe"): "mcore-moe",
    ("config_section", "fsdp"): "megatron-fsdp",
    ("config_section", "inference"): "mcore-inference",
    ("config_section", "rl"): "megatron-rl",
    ("cli_command", "ckpt"): "mcore-ckpt",
    ("cli_command", "generate"): "mcore-inference",
    ("cli_command", "serve"): "mcore-inference",
    ("cli_command", "rl"): "megatron-rl",
}


def provider_of(kind: str, name: str) -> str | None:
    """The package known to provide ``name`` in registry ``kind``, if any."""
    return KNOWN_PROVIDERS.get((kind, name))


@dataclass(frozen=True)
class Lazy:
    """A component named by import path (``"pkg.module:Name"``), imported on first lookup.

    Registering heavy components (anything importing torch) lazily keeps plugin loading, and so
    ``mcore plugins`` and ``mcore --help``, fast.
    """

    target: str

    def resolve(self) -> Any:
        """Import and return the named object."""
        return _import_target(self.target)


@functools.cache
def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise McoreError(f"cannot import component {target!r}: {exc}") from exc
    return obj


@dataclass(frozen=True)
class Component:
    """One registry entry: ``obj`` registered as ``name`` by ``plugin``."""

    kind: str
    name: str
    obj: Any
    plugin: str
    override: bool = False


class Registry:
    """The components of one kind, by name.

    Entries are kept in registration order. A name resolves to its single entry, or to the entry
    registered with ``override=True`` when a plugin replaced another's component.
    """

    def __init__(self, kind: Kind, *, missing_hint: Callable[[str, str], str | None]) -> None:
        self.kind = kind
        self._entries: list[Component] = []
        self._missing_hint = missing_hint

    def add(self, component: Component) -> None:
        """Add one entry; refuses an entry its kind does not accept (a :class:`Lazy` one is
        checked when first resolved), and a second claim on a name unless exactly one side
        overrides."""
        if not isinstance(component.obj, Lazy):
            self._check(component, component.obj)
        for other in self._entries:
            if other.name != component.name:
                continue
            if other.override and component.override:
                raise DuplicateComponentError(
                    f"{self.kind.name} {component.name!r} is overridden by both plugin "
                    f"{other.plugin!r} and plugin {component.plugin!r}; uninstall one of them"
                )
            if not (other.override or component.override):
                raise DuplicateComponentError(
                    f"{self.kind.name} {component.name!r} from plugin {component.plugin!r} is "
                    f"already registered by plugin {other.plugin!r}; pick another name, or "
                    f"register with override=True to replace it"
                )
        self._entries.append(component)

    def discard(self, component: Component) -> None:
        """Drop one entry (no error if it is not there)."""
        self._entries = [c for c in self._entries if c is not component]

    def remove_plugin(self, plugin: str) -> None:
        """Drop every entry that ``plugin`` added."""
        self._entries = [c for c in self._entries if c.plugin != plugin]

    def component(self, name: str) -> Component:
        """The entry that ``name`` resolves to; raises :class:`UnknownComponentError`."""
        found = [c for c in self._entries if c.name == name]
        if not found:
            raise UnknownComponentError(self.kind.name, name, self._unknown_message(name))
        overriding = [c for c in found if c.override]
        return overriding[-1] if overriding else found[-1]

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (a :class:`Lazy` entry is imported and checked
        now)."""
        component = self.component(name)
        if not isinstance(component.obj, Lazy):
            return component.obj
        obj = component.obj.resolve()
        self._check(component, obj)
        return obj

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry ``name`` with the arguments the owning package documents and return
        what it built, refused when it lacks a member of the kind's protocol."""
        built = self.get(name)(*args, **kwargs)
        protocol = _protocol(self.kind.protocol) if self.kind.protocol else None
        missing = missing_members(protocol, built) if protocol is not None else []
        if missing:
            plugin = self.component(name).plugin
            raise McoreError(
                f"{self.kind.name} {name!r} of plugin {plugin!r} built a "
                f"{type(built).__name__}, which lacks {_listed(missing)} of the "
                f"{self.kind.label} protocol ({self.kind.protocol})"
            )
        return built

    def _check(self, component: Component, obj: Any) -> None:
        kind = self.kind
        if not kind.check(obj):
            raise McoreError(
                f"plugin {component.plugin!r} registered {kind.name} {component.name!r} as "
                f"{obj!r}, but a {kind.name} must be {kind.expects}"
            )
        missing = kind.missing_members(obj)
        if missing:
            raise McoreError(
                f"plugin {component.plugin!r} registered {kind.name} {component.name!r} as "
                f"{obj!r}, which lacks {_listed(missing)} of the {kind.label} protocol "
                f"({kind.protocol}); implement them as its docstring says"
            )

    def names(self) -> list[str]:
        """Every resolvable name, sorted."""
        return sorted({c.name for c in self._entries})

    def components(self) -> list[Component]:
        """The entry each name resolves to, sorted by name."""
        return [self.component(n) for n in self.names()]

    def entries(self) -> list[Component]:
        """Every entry in registration order, shadowed ones included."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _unknown_message(self, name: str) -> str:
        label = self.kind.label
        known = self.names()
        msg = f"unknown {label} {name!r}. "
        msg += f"Known: {', '.join(known)}." if known else f"No {label} is registered."
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        hint = self._missing_hint(self.kind.name, name)
        if hint:
            msg += f" {hint}"
        return msg


def _listed(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


class Registries:
    """All registries, one per kind in :data:`KINDS`."""

    def __init__(self, missing_hint: Callable[[str, str], str | None] | None = None) -> None:
        hint = missing_hint or (lambda kind, name: None)
        self._by_kind = {k: Registry(spec, missing_hint=hint) for k, spec in KINDS.items()}

    def __getitem__(self, kind: str) -> Registry:
        try:
            return self._by_kind[kind]
        except KeyError:
            raise McoreError(
                f"unknown registry kind {kind!r}; the kinds are: {', '.join(KINDS)}"
            ) from None

    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``name`` in registry ``kind``."""
        return self[kind].get(name)

    def names(self, kind: str) -> list[str]:
        """Every name registered in ``kind``."""
        return self[kind].names()

    def components_of(self, plugin: str) -> dict[str, list[str]]:
        """``{kind: [names]}`` of what ``plugin`` registered (kinds with none left out)."""
        out: dict[str, list[str]] = {}
        for kind, reg in self._by_kind.items():
            names = sorted(c.name for c in reg.entries() if c.plugin == plugin)
            if names:
                out[kind] = names
        return out

    def add_all(self, components: list[Component]) -> None:
        """Add a plugin's components together: if one is refused, none are kept."""
        added: list[Component] = []
        try:
            for c in components:
                self[c.kind].add(c)
                added.append(c)
        except Exception:
            for c in added:
                self[c.kind].discard(c)
            raise

    def remove_plugin(self, plugin: str) -> None:
        """Drop everything ``plugin`` registered."""
        for reg in self._by_kind.values():
            reg.remove_plugin(plugin)


class PluginRegistrar:
    """What a plugin's ``mcore_register`` hook receives: ``add`` records the plugin's entries."""

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin
        self.components: list[Component] = []

    def add(self, kind: str, name: str, obj: Any, *, override: bool = False) -> None:
        """Register ``obj`` as ``name`` in ``kind``; ``override=True`` replaces another's."""
        if kind not in KINDS:
            raise McoreError(
                f"plugin {self.plugin!r} registered into unknown kind {kind!r}; "
                f"the kinds are: {', '.join(KINDS)}"
            )
        if not isinstance(name, str) or not name:
            raise McoreError(f"plugin {self.plugin!r} registered a {kind} with name {name!r}")
        self.components.append(Component(kind, name, obj, self.plugin, override))
