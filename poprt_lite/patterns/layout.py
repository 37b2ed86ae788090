"""Which ops act per token, and which mix the tokens of a packed row.

In a packed activation `[batch, seq, ...]` several requests share a row. An op that works on
trailing axes only (the FFN, LayerNorm, a QA head) is indifferent to that; an op that reduces,
selects or moves along the batch or sequence axis (mean pooling, CLS selection, a MatMul between
two activations) would mix requests, and must run on per-request rows.

Which tensors lead with the packed `[batch, seq]` axes is found by shape inference on a probe
(`TokenAxes`), never from the dim names an exporter declared: exporters name the dims of outputs
and intermediates as they like (`LayerNormalizationlast_hidden_state_dim_0`, `unk__5`), so equal
names prove nothing and different names disprove nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from poprt_lite.patterns.attention import constant_array, is_constant

# Ops whose output element depends only on the same element (or the same token) of the inputs.
ELEMENTWISE = {
    "Abs", "Add", "And", "BitShift", "Cast", "CastLike", "Ceil", "Clip", "Cos", "Div", "Dropout", "Elu",
    "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "Identity",
    "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mod", "Mul",
    "Neg", "Not", "Or", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
    "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tanh", "Where", "Xor", "HardSwish", "Mish",
}
# onnxruntime's transformer-optimizer fusions that act per token (com.microsoft domain).
ELEMENTWISE |= {"BiasGelu", "FastGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
# Ops that act along one axis (attribute `axis`, default below) or over trailing axes.
AXIS_OPS = {
    "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LayerNormalization": -1, "Split": 0,
    "Concat": None, "ArgMax": 0, "ArgMin": 0, "Gather": 0, "TopK": -1,
}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}

TOKENWISE, MIXING, UNKNOWN = "tokenwise", "mixing", "unknown"


# Concrete [batch, seq] given to symbolic token dims in the probe: values no exporter uses for
# another axis next to each other (heads, head sizes, hidden sizes and label counts are not 3, 37).
PROBE_DIMS = (3, 37)
# Initializers larger than this are handed to the probe as typed inputs: shape inference needs only
# the values of small (shape) tensors, and copying weights would cost as much as the model.
PROBE_MAX_CONSTANT = 4096


@dataclass(frozen=True)
class TokenAxes:
    """Which tensors of a graph lead with the packed `[batch, seq]` axes of the token input.

    Built by `token_dims`: the graph's inputs that share the token input's leading dims get
    concrete probe sizes (`PROBE_DIMS`, or the declared sizes when static), every other shape is
    forgotten, and onnx shape inference (with data propagation, so Reshape targets computed from
    Shape are followed) gives each tensor its probe shape. A tensor is token-major when its probe
    shape starts with the probe's [batch, seq]. Tensors created after the probe are not.
    """

    dims: tuple  # the token input's declared [batch, seq] (ints or names)
    probe: tuple[int, int]
    shapes: Mapping[str, tuple] = field(default_factory=dict)  # probe shape by tensor name

    def shape(self, tensor: gs.Tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return None
        return self.shapes.get(tensor.name)

    def token_major(self, tensor: gs.Tensor) -> bool:
        shape = self._leading(tensor)
        return shape is not None and shape == (self.probe[0], self.probe[1])

    def keeps_sequence(self, tensor: gs.Tensor) -> bool:
        """Is axis 1 of `tensor` the sequence axis (per token, packed or per-request rows)?"""
        shape = self._leading(tensor)
        return shape is not None and shape[1] == self.probe[1]

    def _leading(self, tensor: gs.Tensor) -> tuple | None:
        """The probe's first two dims of `tensor`; where inference knew nothing (ops without an
        inference function, e.g. onnxruntime's fused ops), its declared dims against the token input's."""
        if isinstance(tensor, gs.Constant):
            return None
        shape = self.shapes.get(tensor.name)
        if shape is not None and len(shape) >= 2 and None not in shape[:2]:
            return tuple(shape[:2])
        declared = tensor.shape
        if declared is not None and len(declared) >= 2:
            return tuple(p if d == t else None for d, t, p in zip(declared[:2], self.dims, self.probe))
        return None

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor) if not isinstance(tensor, gs.Constant) else tensor.shape
        if shape is None and tensor.shape is not None:
            shape = tensor.shape
        return None if shape is None else len(shape)


def token_dims(graph: gs.Graph, input_name: str) -> TokenAxes:
    """The token axes of `graph`, whose token ids come in as `input_name` ([batch, seq])."""
    token_input = next(t for t in graph.inputs if t.name == input_name)
    dims = tuple(token_input.shape[:2])
    static = all(isinstance(d, int) and d > 0 for d in dims)
    probe = tuple(int(d) for d in dims) if static else PROBE_DIMS
    return TokenAxes(dims, probe, probe_shapes(graph, dims, probe))


def probe_shapes(graph: gs.Graph, dims: tuple, probe: tuple[int, int]) -> dict[str, tuple]:
    """Every tensor's shape (None for unknown dims) when the inputs leading with the token input's
    declared `dims` get the concrete sizes `probe`, by shape inference on the weightless structure."""
    copy = graph.copy()
    for tensor in copy.inputs:
        if tensor.shape is not None and tuple(tensor.shape[:2]) == dims:
            tensor.shape = [*probe, *tensor.shape[2:]]
    interface = {t.name for t in copy.inputs}
    weights: dict[str, gs.Variable] = {}
    for node in copy.nodes:
        if node.domain not in (None, "", "ai.onnx") and node.op in ELEMENTWISE:
            # onnxruntime's per-token fusions have no ONNX shape inference: shaped like their input
            node.op, node.domain, node.attrs = "Identity", "", {}
            node.inputs, node.outputs = node.inputs[:1], node.outputs[:1]
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.values.size > PROBE_MAX_CONSTANT:
                if tensor.name not in weights:
                    weights[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                node.inputs[i] = weights[tensor.name]
            elif isinstance(tensor, gs.Variable) and tensor.name not in interface:
                tensor.shape = None
        for tensor in node.outputs:
            tensor.shape = None
    copy.inputs = [*copy.inputs, *weights.values()]
    try:
        model = gs.export_onnx(copy.toposort(), do_type_check=False)
        del model.graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # an op without inference: nothing is known to be token-major
        return {}
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim)
    return shapes


def is_token_major(tensor: gs.Tensor, dims: TokenAxes) -> bool:
    """Does `tensor` lead with the packed [batch, seq] axes?"""
    return dims.token_major(tensor)


def constant_ints(tensor: gs.Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor (initializer or Constant node), else None."""
    values = None if tensor is None else constant_array(tensor)
    return None if values is None else [int(v) for v in values.reshape(-1)]


def _normalized(axes: list[int], rank: int) -> set[int]:
    return {a + rank if a < 0 else a for a in axes}


def classify(node: gs.Node, tensor: gs.Tensor, dims: TokenAxes) -> str:
    """How `node` treats its token-major input `tensor`: per token, mixing tokens, or unknown."""
    rank = dims.rank(tensor)
    token_axes = {0, 1}
    op = node.op
    if op in ELEMENTWISE:
        return TOKENWISE
    if op in REDUCE_OPS:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = constant_ints(node.inputs[1])
        if axes is None:  # reduce over everything (or axes computed at run time)
            return MIXING
        return MIXING if _normalized(list(axes), rank) & token_axes else TOKENWISE
    if op in ("MatMul", "Gemm"):
        others = [t for t in node.inputs if t is not tensor]
        return TOKENWISE if node.inputs[0] is tensor and all(is_constant(t) for t in others) else MIXING
    if op in AXIS_OPS:
        if op == "Gather" and node.inputs[0] is not tensor:
            return TOKENWISE  # token ids looking up a table
        axis = node.attrs.get("axis", AXIS_OPS[op])
        if axis is None:
            return UNKNOWN
        return MIXING if _normalized([axis], rank) & token_axes else TOKENWISE
    if op == "CumSum":
        axis = constant_ints(node.inputs[1])
        return UNKNOWN if axis is None else (MIXING if _normalized(axis, rank) & token_axes else TOKENWISE)
    if op == "Slice":
        axes = constant_ints(node.inputs[3]) if len(node.inputs) > 3 else list(range(len(node.inputs[1].shape or [rank])))
        return UNKNOWN if axes is None else (MIXING if _normalized(axes, rank) & token_axes else TOKENWISE)
    if op == "Transpose":
        perm = node.attrs.get("perm", list(range(rank))[::-1])
        return TOKENWISE if list(perm[:2]) == [0, 1] else MIXING
    if op in ("Reshape", "Flatten", "Expand", "Tile", "Squeeze", "Unsqueeze"):
        return TOKENWISE if is_token_major(node.outputs[0], dims) else MIXING
    if op == "Shape":
        return TOKENWISE
    return UNKNOWN
