"""add_checkpoints: make intermediate tensors graph outputs, to debug precision (PopRT's pass of that name)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass


@register_pass("add_checkpoints")
class AddCheckpoints(Pass):
    """Add the named intermediate tensors to the graph outputs (--checkpoints)."""

    @dataclass
    class Options:
        tensors: tuple[str, ...] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        tensors = graph.tensors()
        outputs = {t.name for t in graph.outputs}
        wanted = [name for name in dict.fromkeys(self.options.tensors) if name not in outputs]
        for name in wanted:
            tensor = tensors.get(name)
            if not isinstance(tensor, gs.Variable):
                what = "a constant" if name in tensors else "no tensor of the model"
                raise PoprtError(f"add_checkpoints names '{name}', which is {what}; name a tensor a node computes")
        types = _inferred_types(graph, [name for name in wanted if tensors[name].dtype is None or tensors[name].shape is None])
        for name in wanted:
            tensor = tensors[name]
            if name in types:
                elem_type, shape = types[name]
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
                tensor.shape = shape
            if tensor.dtype is None or tensor.shape is None:
                raise PoprtError(f"add_checkpoints cannot tell the type and rank of '{name}' (shape inference does not reach it)")
            graph.outputs.append(tensor)
        return PassResult(changed=bool(wanted), message=f"{len(wanted)} tensors made outputs")


def _inferred_types(graph: gs.Graph, names: list[str]) -> dict[str, tuple[int, list]]:
    """Element type and dims of `names` by onnx shape inference (exports rarely carry value_info)."""
    if not names:
        return {}
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph, do_type_check=False))
    found = {}
    for value in model.graph.value_info:
        tensor_type = value.type.tensor_type
        if value.name in names and tensor_type.elem_type and tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
            found[value.name] = (tensor_type.elem_type, dims)
    return found
