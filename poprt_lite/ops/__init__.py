"""Custom ops of the ``ai.graphcore`` domain (version 1) for packed inference.

Importing this package registers every op's schema with `onnx.defs`, so `onnx.checker` and
`onnx.shape_inference` accept the ops. `attach_functions` adds the ops' function bodies to a model
so onnxruntime runs them; `reference_ops()` gives the numpy kernels for
`onnx.reference.ReferenceEvaluator(model, new_ops=reference_ops())`.

All ops share the unpack_info layout: unpack_info[N] holds the lengths of the requests packed one
after another into the flattened B*S token stream, 0 for unused slots, which come last.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import onnx
from onnx.reference.op_run import OpRun

from poprt_lite.errors import PoprtError
from poprt_lite.ops import attention_mask, padding_mask, repack, segment_pool, unpack
from poprt_lite.ops.base import DOMAIN, MIN_ONNX_OPSET, OPSET_VERSION, CustomOp

__all__ = [
    "DOMAIN",
    "MIN_ONNX_OPSET",
    "OPSET_VERSION",
    "REGISTRY",
    "CustomOp",
    "attach_functions",
    "get_op",
    "list_ops",
    "make_node",
    "normalize_poprt_forms",
    "reference_ops",
    "validate_inputs",
]

REGISTRY: dict[str, CustomOp] = {
    op.name: op for op in (attention_mask.OP, unpack.OP, repack.OP, padding_mask.OP, segment_pool.OP)
}

for _op in REGISTRY.values():
    if not onnx.defs.has(_op.name, _op.version, DOMAIN):
        onnx.defs.register_schema(_op.schema)


def get_op(name: str) -> CustomOp:
    """The custom op called `name`; PoprtError naming the known ops otherwise."""
    if name not in REGISTRY:
        raise PoprtError(f"unknown {DOMAIN} op '{name}' (known: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def list_ops() -> list[CustomOp]:
    """All custom ops."""
    return list(REGISTRY.values())


def reference_ops() -> list[type[OpRun]]:
    """numpy reference kernels, for `onnx.reference.ReferenceEvaluator(..., new_ops=...)`."""
    return [op.reference for op in REGISTRY.values()]


def validate_inputs(op_name: str, *arrays: np.ndarray, **attrs: Any) -> dict[str, int]:
    """Check inputs and attributes of op `op_name` (PoprtError); return the resolved attributes."""
    return get_op(op_name).validate(*arrays, **attrs)


def make_node(
    op_name: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs: int
) -> onnx.NodeProto:
    """A node of custom op `op_name` with checked attributes (defaults written out)."""
    op = get_op(op_name)
    return onnx.helper.make_node(
        op.name, inputs, outputs, name=name, domain=DOMAIN, **op.resolve_attributes(attrs)
    )


def _graph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
            for sub in subgraphs:
                yield from _graph_nodes(sub)


def normalize_poprt_forms(model: onnx.ModelProto) -> int:
    """Rewrite nodes written in PopRT's op signatures (e.g. `AttentionMask(mask, scores)` with
    `dataType`, `Unpack` with `segment_max_size=[L]`) into poprt-lite's, whose function bodies run
    them; the number of nodes rewritten."""
    return sum(
        REGISTRY[n.op_type].normalize(n) for n in _graph_nodes(model.graph) if n.domain == DOMAIN and n.op_type in REGISTRY
    )


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the function bodies and the DOMAIN opset import for the custom ops the model uses,
    after rewriting nodes in PopRT's signatures into poprt-lite's (normalize_poprt_forms).

    Bodies are rendered for the model's ONNX opset (>= MIN_ONNX_OPSET). Idempotent; mutates and
    returns `model`.
    """
    normalize_poprt_forms(model)
    used = sorted({n.op_type for n in _graph_nodes(model.graph) if n.domain == DOMAIN})
    if not used:
        return model
    imports = {o.domain: o.version for o in model.opset_import}
    if imports.get(DOMAIN, OPSET_VERSION) != OPSET_VERSION:
        raise PoprtError(
            f"model imports {DOMAIN} version {imports[DOMAIN]}, poprt-lite provides "
            f"version {OPSET_VERSION}"
        )
    onnx_opset = imports.get("", imports.get("ai.onnx"))
    if onnx_opset is None:
        raise PoprtError("model imports no ONNX opset; add an opset_import for domain ''")
    present = {(f.domain, f.name) for f in model.functions}
    missing = [get_op(t).function(onnx_opset) for t in used if (DOMAIN, t) not in present]
    if DOMAIN not in imports:
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    model.functions.extend(missing)
    return model
