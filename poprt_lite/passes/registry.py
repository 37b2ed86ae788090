"""The pass registry: built-in passes and plugins, by name.

Plugins are Python modules that register passes with `@register_pass` (or PopRT's name for it,
`@register`). Plugins are found through the entry-point group `poprt_lite.passes` of any installed
distribution, or given explicitly as a file path or module name (`--plugin`, `--custom_pass_config`).

Two extension points let a layer above teach the registry another pass API without the registry
knowing it: `add_alias` (other names of passes: PopRT's, compat/poprt_names.py) and `add_kind`
(classes written against another pass API, adapted to passes: PopRT's model-level passes,
compat/poprt_api.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import onnx
import onnx_graphsurgeon as gs

from poprt_lite.errors import PoprtError, one_line, option
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.manager import PassManager

ENTRY_POINT_GROUP = "poprt_lite.passes"


class PassKind(Protocol):
    """Pass classes written against another API (`add_kind`)."""

    def adapt(self, obj: Any) -> type[Pass] | None:
        """The pass class the registry stores for `obj`, or None when `obj` is not of this kind."""

    def call(self, instance: Pass, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """`instance(model)` run this kind's way, or None when `instance` is not of this kind."""


_REGISTRY: dict[str, type[Pass]] = {}
_ALIASES: dict[str, str] = {}  # another name of a pass -> its registered name
_KINDS: list[PassKind] = []
_loaded_entry_points = False
_registered_by_import: list[str] | None = None  # names registered while load_plugin imports a module


def register_pass(name: str, description: str | None = None) -> Callable[[Any], Any]:
    """Register a Pass subclass, or a function `(graph, ctx) -> bool | PassResult`, under `name`.

    The description defaults to the first line of the docstring.
    """

    def decorate(obj: Any) -> Any:
        doc = description if description is not None else ((obj.__doc__ or "").strip().splitlines() or [""])[0]
        adapted = next((cls for cls in (kind.adapt(obj) for kind in _KINDS) if cls is not None), None)
        if adapted is not None:
            cls = adapted
            obj.name, obj.description = name, doc.strip()
        elif isinstance(obj, type) and issubclass(obj, Pass):
            cls = obj
        elif callable(obj):
            cls = type(obj.__name__, (_FunctionPass,), {"function": staticmethod(obj), "__module__": obj.__module__})
        else:
            raise TypeError(f"@register_pass('{name}') needs a Pass subclass or a function, got {obj!r}")
        cls.name = name
        cls.description = doc.strip()
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise PoprtError(f"pass name '{name}' is registered twice ({_REGISTRY[name].__module__} and {cls.__module__}); rename one")
        _REGISTRY[name] = cls
        if _registered_by_import is not None:
            _registered_by_import.append(name)
        return obj

    return decorate


class _FunctionPass(Pass):
    function: Callable[[gs.Graph, PassContext], bool | PassResult]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = self.function(graph, ctx)
        return result if isinstance(result, PassResult) else PassResult(changed=bool(result))


register = register_pass  # PopRT's name: `from poprt.passes import register` ports as `from poprt_lite.passes import register`


def add_alias(alias: str, name: str) -> None:
    """Let `alias` name the pass registered as `name` (in `get_pass`, pipelines and pass options)."""
    _ALIASES[alias] = name


def canonical_name(name: str) -> str:
    """The registered name of a pass given by that name or an alias."""
    return _ALIASES.get(name, name)


def add_kind(kind: PassKind) -> None:
    """Adapt pass classes written against another API when they are registered or called."""
    _KINDS.append(kind)


def call_alone(instance: Pass, model: onnx.ModelProto) -> onnx.ModelProto:
    """`Pass.__call__`: run one pass alone on a ModelProto (in a PassManager, unless its kind runs it)."""
    for kind in _KINDS:
        result = kind.call(instance, model)
        if result is not None:
            return result
    result, _ = PassManager([instance]).run(model)
    return result


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`, or the poprt-lite pass doing the job of PopRT pass `name`."""
    load_entry_point_plugins()
    found = _REGISTRY.get(name) or _REGISTRY.get(canonical_name(name))
    if found is None:
        known = ", ".join(sorted(_REGISTRY))
        raise PoprtError(f"unknown pass '{name}'; known passes: {known} (add your own with {option('load_plugin')})")
    return found


def get_registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (PopRT's `get_registered_passes`)."""
    load_entry_point_plugins()
    return dict(sorted(_REGISTRY.items()))


def list_passes() -> list[type[Pass]]:
    load_entry_point_plugins()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def load_plugin(spec: str) -> list[str]:
    """Import a plugin given as a path to a .py file or as a module name; the pass names it registered."""
    global _registered_by_import
    _registered_by_import = []
    try:
        _import_plugin(spec)
        return _registered_by_import
    finally:
        _registered_by_import = None


def _import_plugin(spec: str) -> None:
    try:
        if spec.endswith(".py") or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise PoprtError(f"plugin file '{spec}' does not exist; check {option('load_plugin')}")
            module_name = f"poprt_lite_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        else:
            importlib.import_module(spec)
    except PoprtError:
        raise
    except Exception as exc:  # a plugin may fail in any way; report it, never hide it
        raise PoprtError(f"plugin '{spec}' failed to import: {one_line(exc)}") from exc


def load_entry_point_plugins() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry_point.load()
        except Exception as exc:
            raise PoprtError(
                f"plugin '{entry_point.value}' (entry point '{entry_point.name}' of group {ENTRY_POINT_GROUP}) failed to import: {one_line(exc)}"
            ) from exc
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj.name or entry_point.name)(obj)

