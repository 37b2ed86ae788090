"""What a pass is: a named, described transformation of a graphsurgeon graph with typed options."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from poprt_lite.errors import PoprtError


@dataclass
class PassResult:
    """What a pass did, for the pipeline report: whether it changed the graph, and a short account.

    The contract: a pass edits the graph it is given in place, and the pass manager keeps that
    graph whatever `changed` says. `changed` is a report (the "changed" column of the pipeline
    table and of the artifact manifest), never a switch: a pass that edits the graph and returns
    `changed=False` still has its edit kept, and checked like any other. After every pass, changed
    or not, the manager cleans up and sorts the graph and stops the pipeline with a `PassError`
    naming the pass if the result is not a valid model. `run` must return a `PassResult` (a
    function registered as a pass may return a bool instead).
    """

    changed: bool
    message: str = ""


@dataclass
class PassContext:
    """State shared by the passes of one pipeline besides the graph.

    `metadata` ends up in the model's metadata_props (prefixed `poprt_lite.`) and in the artifact
    manifest: e.g. `position_offset`, `pack.mode`, input roles.
    """

    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class NoOptions:
    pass


class Pass:
    """Base class of every pass. Subclasses set `name`, `description`, optionally an `Options`
    dataclass, and implement `run`. Instances are configured once and may be run on many graphs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # True for a pass that rewrites onnxruntime's ops of the ONNX domain (`ir.ONNXRUNTIME_ONNX_OPS`)
    # into standard ONNX: a pipeline holding it opens models that use them.
    accepts_onnxruntime_ops: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an Options instance or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # Any pass can be called on a ModelProto; a pass kind registered with `registry.add_kind` (PopRT's
    # model-level passes, compat/poprt_api.py) may run such a call its own way.
    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Run this pass alone on `model`; return the resulting model."""
        from poprt_lite.passes import registry  # the registry imports this module

        return registry.call_alone(self, model)

    def traverse_graph(self, graph: onnx.GraphProto, transform: Any, is_main_graph: bool = True) -> onnx.GraphProto:
        """Apply `transform(graph, is_main_graph)` to `graph` and, first, to every subgraph of its nodes
        (If branches, Loop and Scan bodies): PopRT's helper for passes that edit a GraphProto."""
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    attribute.g.CopyFrom(self.traverse_graph(attribute.g, transform, False))
                for sub in attribute.graphs:
                    sub.CopyFrom(self.traverse_graph(sub, transform, False))
        return transform(graph, is_main_graph)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> "Pass":
        """Build the pass from `key=value` strings (CLI `--pass_option NAME.KEY=VALUE`), parsed by the
        types the Options dataclass declares."""
        hints = typing.get_type_hints(cls.Options)
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        kwargs = {}
        for key, text in values.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise PoprtError(f"pass '{cls.name}' has no option '{key}'; its options are: {known}")
            kwargs[key] = _parse(text, hints[key], f"option '{key}' of pass '{cls.name}'")
        return cls(**kwargs)


def _parse(text: str, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if origin in (list, tuple):
            return origin(_parse(part, args[0], what) for part in text.split(",") if part)
        if hint in (int, float, str):
            return hint(text)
    except ValueError:
        raise PoprtError(f"{what} expects {getattr(hint, '__name__', hint)}, got '{text}'") from None
    raise PoprtError(f"{what} cannot be set from the command line")
