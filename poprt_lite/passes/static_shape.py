"""static_shape: pin input dims, then fold all shape arithmetic away.

With `dynamic_rows` the first (row) dim of the pinned inputs stays dynamic and its `--input_shape`
value becomes a bound, recorded as the `rows` metadata: every other dim is pinned and folded, so a
runtime without static shapes (onnxruntime) can run a batch on the rows it uses and skip empty ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import logging

import onnx_graphsurgeon as gs

from poprt_lite import vocab
from poprt_lite.errors import PoprtError, option
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.cleanup import fold_until_stable
from poprt_lite.passes.registry import register_pass

log = logging.getLogger(__name__)


@register_pass("static_shape")
class StaticShape(Pass):
    """Pin input dims (--input_shape), propagate shapes and fold the now-constant shape arithmetic."""

    @dataclass
    class Options:
        input_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
        size_threshold_mb: int = 64
        dynamic_rows: bool = False  # keep the first dim of the pinned inputs dynamic, bounded by its value

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        shapes = self.options.input_shape
        inputs = {t.name: t for t in graph.inputs}
        symbols: dict[str, int | str] = {}
        if self.options.dynamic_rows:
            shapes = _dynamic_rows(shapes, inputs, symbols, ctx)
        for name, dims in shapes.items():
            if name not in inputs:
                raise PoprtError(
                    f"{option('input_shape')} names '{name}', which is not a model input; inputs are: {', '.join(inputs)}"
                )
            current = inputs[name].shape
            if current is not None and len(current) != len(dims):
                raise PoprtError(
                    f"{option('input_shape')} gives '{name}' {len(dims)} dims but the input has rank {len(current)} ({_fmt(current)})"
                )
            for old, new in zip(current or [], dims):
                if isinstance(old, int) and old > 0 and old != new:
                    raise PoprtError(f"{option('input_shape')} gives '{name}' shape {_fmt(dims)} but its static shape is {_fmt(current)}")
                if isinstance(old, str):
                    if symbols.setdefault(old, new) != new:
                        raise PoprtError(f"{option('input_shape')} gives dim '{old}' two values: {symbols[old]} and {new}")
        changed = False
        for tensor in graph.inputs:
            dims = shapes.get(tensor.name)
            if dims is None:
                if tensor.shape is None:
                    raise PoprtError(f"input '{tensor.name}' has no shape; give it with {option('input_shape')} {tensor.name}=...")
                # Inputs that share a symbolic dim with a pinned one (e.g. 'batch') follow it.
                dims = tuple(symbols.get(d, d) if isinstance(d, str) else d for d in tensor.shape)
                rows = {symbol for symbol, value in symbols.items() if value == symbol}  # dynamic_rows: kept dynamic
                free = [d for d in dims if not (isinstance(d, int) and d > 0) and d not in rows]
                if free:
                    raise PoprtError(
                        f"input '{tensor.name}' keeps dynamic dims {_fmt(tensor.shape)} after {option('input_shape')}; add {tensor.name}=... to {option('input_shape')}"
                    )
            if list(tensor.shape or []) != list(dims):
                tensor.shape = list(dims)
                changed = True
        before = len(graph.nodes)
        fold_until_stable(graph, self.options.size_threshold_mb)
        dynamic = [t.name for t in graph.tensors().values() if isinstance(t, gs.Variable) and not _static(t)]
        if dynamic and not self.options.dynamic_rows:
            # Ops without an onnx shape-inference function (e.g. com.microsoft fusions) leave their
            # outputs unknown to onnx although onnxruntime runs them at the pinned shape.
            log.warning(
                "static_shape: %d values have no static shape after pinning the inputs (first: '%s')", len(dynamic), dynamic[0]
            )
        folded = before - len(graph.nodes)
        return PassResult(changed=changed or folded > 0, message=f"inputs pinned, {folded} nodes folded")


def _dynamic_rows(shapes: dict, inputs: dict, symbols: dict, ctx: PassContext) -> dict:
    """`shapes` with each pinned input's first dim left as the model's symbol for it (mapped to itself
    in `symbols`, so inputs sharing it follow); the bound, --input_shape's value, goes to `rows`."""
    bounds = {dims[0] for dims in shapes.values() if dims}
    if len(bounds) > 1:
        raise PoprtError(f"{option('input_shape')} gives the rows (first dims) {sorted(bounds)}; with dynamic rows they must agree")
    kept = {}
    for name, dims in shapes.items():
        current = inputs[name].shape if name in inputs else None
        first = current[0] if current else None
        if name in inputs and not isinstance(first, str):
            raise PoprtError(
                f"input '{name}' has first dim {first!r}; dynamic rows keep a symbolic first dim (export the model with a dynamic batch axis)"
            )
        kept[name] = (first, *dims[1:]) if name in inputs else dims
        if name in inputs:
            symbols[first] = first
    if bounds:
        vocab.set_int(ctx.metadata, vocab.MetaKey.rows, bounds.pop())
    return kept


def _static(tensor: gs.Variable) -> bool:
    return tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape)


def _fmt(dims) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"
