"""float_to_half: run the model in float16 (`--precision fp16`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass

log = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
# Attributes that name an output element type.
DTYPE_ATTRS = ("to", "dtype")


@register_pass("float_to_half")
class FloatToHalf(Pass):
    """Convert float32 weights, constants, casts and values to float16 (graph I/O stays float32 unless fp16_io)."""

    @dataclass
    class Options:
        fp16_io: bool = False
        skip_op_types: tuple[str, ...] = field(default_factory=tuple)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        looped = next((n for n in graph.nodes if any(isinstance(v, onnx.GraphProto) for v in n.attrs.values())), None)
        if looped is not None:  # token_stream_loop's attention bodies, built for float32 and opaque to this pass
            raise PoprtError(f"{self.name} cannot convert node '{looped.name}' ({looped.op}): its body is an attention Loop over the requests (mode=token_stream_loop), built in float32; use precision fp32 with that mode, or mode=token_stream")
        skip = set(self.options.skip_op_types)
        kept_fp32 = _constants_only_used_by(graph, skip)
        converted = clamped = 0
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.dtype == np.float32 and tensor.name not in kept_fp32:
                tensor.values, n = _to_half(tensor.values, tensor.name)
                clamped += n
                converted += 1
        for node in graph.nodes:
            if node.op in skip:
                continue
            for key, value in node.attrs.items():
                if isinstance(value, gs.Constant) and value.dtype == np.float32:  # Constant / ConstantOfShape
                    value.values, n = _to_half(value.values, node.name)
                    clamped += n
                    converted += 1
                elif key in DTYPE_ATTRS and _is_float32_type(value):
                    node.attrs[key] = FLOAT16
                    converted += 1
        boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.dtype == np.float32 and tensor.name not in boundary:
                tensor.dtype = np.float16
        for node in [n for n in graph.nodes if n.op in skip]:
            _wrap_in_float32(graph, node)
        if self.options.fp16_io:
            _cast_interface(graph, np.float16)
        else:
            _insert_boundary_casts(graph)
        if clamped:
            log.warning("float_to_half: %d constant values outside the float16 range were clamped to +-%g", clamped, FP16_MAX)
        return PassResult(changed=converted > 0, message=f"{converted} tensors/attributes to float16, {clamped} values clamped")


def _is_float32_type(value) -> bool:
    return value == FLOAT or value is np.float32 or (isinstance(value, np.dtype) and value == np.float32)


def _to_half(values: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Clamp to the float16 range (attention masks use -inf or float32's min) and convert."""
    values = np.asarray(values)
    outside = np.abs(values) > FP16_MAX
    return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), int(np.count_nonzero(outside))


def _constants_only_used_by(graph: gs.Graph, op_types: set[str]) -> set[str]:
    if not op_types:
        return set()
    return {
        t.name
        for t in graph.tensors().values()
        if isinstance(t, gs.Constant) and t.outputs and all(n.op in op_types for n in t.outputs)
    }


def _wrap_in_float32(graph: gs.Graph, node: gs.Node) -> None:
    """Keep `node` in float32: Cast its float16 inputs up and its outputs back down."""
    for i, tensor in enumerate(node.inputs):
        if tensor.dtype == np.float16 and not isinstance(tensor, gs.Constant):
            up = gs.Variable(f"{tensor.name}_fp32_for_{node.name}", dtype=np.float32, shape=tensor.shape)
            graph.nodes.append(gs.Node("Cast", inputs=[tensor], outputs=[up], attrs={"to": FLOAT}))
            node.inputs[i] = up
    for i, tensor in enumerate(node.outputs):
        if tensor.dtype == np.float16:
            inner = gs.Variable(f"{tensor.name}_fp32", dtype=np.float32, shape=tensor.shape)
            node.outputs[i] = inner
            graph.nodes.append(gs.Node("Cast", inputs=[inner], outputs=[tensor], attrs={"to": FLOAT16}))


def _insert_boundary_casts(graph: gs.Graph) -> None:
    """Graph inputs/outputs keep float32; Cast nodes convert at the boundary."""
    for tensor in graph.inputs:
        if tensor.dtype == np.float32 and tensor.outputs:
            inner = gs.Variable(f"{tensor.name}_fp16", dtype=np.float16, shape=tensor.shape)
            ir.replace_all_uses(tensor, inner)
            graph.nodes.append(gs.Node("Cast", inputs=[tensor], outputs=[inner], attrs={"to": FLOAT16}))
    for i, tensor in enumerate(graph.outputs):
        if tensor.dtype == np.float32 and tensor.inputs:
            inner = gs.Variable(f"{tensor.name}_fp16", dtype=np.float16, shape=tensor.shape)
            producer = tensor.inputs[0]
            producer.outputs[producer.outputs.index(tensor)] = inner
            ir.replace_all_uses(tensor, inner)
            graph.nodes.append(gs.Node("Cast", inputs=[inner], outputs=[tensor], attrs={"to": FLOAT}))


def _cast_interface(graph: gs.Graph, dtype) -> None:
    for tensor in list(graph.inputs) + list(graph.outputs):
        if tensor.dtype == np.float32:
            tensor.dtype = dtype
