"""PopRT's pass API on poprt-lite's passes: model-level passes, `register`, `traverse_graph`.

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
in a PassManager.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError
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


def call(instance: Pass, model: onnx.ModelProto) -> onnx.ModelProto:
    """`Pass.__call__`: run one pass on a ModelProto and return the resulting model."""
    if is_model_level(type(instance)):
        return _checked(instance, instance.run(model))
    from poprt_lite.passes.manager import PassManager

    result, _ = PassManager([instance]).run(model)
    return result


def traverse_graph(
    graph: onnx.GraphProto, transform: Callable[[onnx.GraphProto, bool], onnx.GraphProto], is_main_graph: bool = True
) -> onnx.GraphProto:
    """PopRT's `Pass.traverse_graph`: apply `transform(graph, is_main_graph)` to the graph and,
    first, to every subgraph of its nodes (If branches, Loop and Scan bodies)."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                attribute.g.CopyFrom(traverse_graph(attribute.g, transform, False))
            for sub in attribute.graphs:
                sub.CopyFrom(traverse_graph(sub, transform, False))
    return transform(graph, is_main_graph)


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


def adapt(cls: type[Pass]) -> type[Pass]:
    """The class the registry stores for model-level pass `cls`."""
    return type(cls.__name__, (ModelPassAdapter,), {"target": cls, "__module__": cls.__module__, "__doc__": cls.__doc__})


def _checked(instance: Any, result: Any) -> onnx.ModelProto:
    if not isinstance(result, onnx.ModelProto):
        raise PoprtError(f"{type(instance).__name__} returned {type(result).__name__}; a PopRT-style pass must return the onnx.ModelProto")
    return result
