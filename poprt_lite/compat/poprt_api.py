"""PopRT's pass API on poprt-lite's passes: model-level passes (with `register` and
`Pass.traverse_graph`, which the pass layer has under PopRT's names).

A pass file written for PopRT runs with its imports changed from `poprt` to `poprt_lite`:

    from poprt_lite.passes import Pass, register      # was: from poprt.passes import Pass, register

    @register("replace_add_with_sub")
    class ReplaceAddWithSub(Pass):
        def run(self, onnx_model: onnx.ModelProto) -> onnx.ModelProto:   # or __call__(self, model)
            ...

Such a class is *model-level*: it overrides `run` with one argument (an `onnx.ModelProto`) or
overrides `__call__`, and returns the model. The registry stores an adapter for it (`adapt`), so
the pass manager runs it like any pass: the graph is exported to a ModelProto, the pass edits and
returns it, and the result is imported back (then cleaned up, checked and shape-inferred as after
every pass). PopRT passes take no options from the command line, and neither do these.

Every pass, built-in or not, is also callable on a ModelProto as in PopRT
(`get_pass("float_to_half", skip_op_types=["Gelu"])(model)`): a graph-level pass then runs alone
in a PassManager, a model-level one on the model itself. Importing this module adds the model-level
kind to the pass registry (`registry.add_kind`); `poprt_lite.compat` imports it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError
from poprt_lite.passes import registry
from poprt_lite.passes.base import Pass, PassContext, PassResult


def is_model_level(cls: type) -> bool:
    """Whether `cls` is written against PopRT's API (run(onnx_model) or __call__(model))."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        return False
    if cls.__call__ is not Pass.__call__:
        return True
    if cls.run is Pass.run:
        return False
    positional = [
        p for p in inspect.signature(cls.run).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) == 2  # (self, onnx_model); poprt-lite's is (self, graph, ctx)


def call(instance: Pass, model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`Pass.__call__` of a model-level pass: its `run` on the model itself (None for any other pass)."""
    if not is_model_level(type(instance)):
        return None
    return _checked(instance, instance.run(model))


class ModelPassAdapter(Pass):
    """Runs a model-level (PopRT-style) pass class inside poprt-lite's pass manager."""

    target: ClassVar[type[Pass]]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        model = gs.export_onnx(graph, do_type_check=False)
        before = model.SerializeToString()
        try:
            instance = self.target()
        except TypeError as exc:
            raise PoprtError(f"cannot create {self.target.__name__}() without arguments ({exc}); PopRT-style passes take no options") from None
        after = _checked(instance, instance(model))
        changed = after.SerializeToString() != before
        vars(graph).update(vars(ir.to_graph(after)))  # the manager keeps working on `graph`
        return PassResult(changed=changed, message="model edited (PopRT pass API)" if changed else "model unchanged")


def adapt(cls: Any) -> type[Pass] | None:
    """The class the registry stores for model-level pass `cls` (None for any other class)."""
    if not is_model_level(cls):
        return None
    return type(cls.__name__, (ModelPassAdapter,), {"target": cls, "__module__": cls.__module__, "__doc__": cls.__doc__})


def _checked(instance: Any, result: Any) -> onnx.ModelProto:
    if not isinstance(result, onnx.ModelProto):
        raise PoprtError(f"{type(instance).__name__} returned {type(result).__name__}; a PopRT-style pass must return the onnx.ModelProto")
    return result


class _ModelLevel:
    """The model-level kind of pass, as the registry takes it (`registry.PassKind`)."""

    adapt = staticmethod(adapt)
    call = staticmethod(call)


registry.add_kind(_ModelLevel())
