"""Which ops act per token, and which mix the tokens of a packed row.

In a packed activation `[batch, seq, ...]` several requests share a row. An op that works on
trailing axes only (the FFN, LayerNorm, a QA head) is indifferent to that; an op that reduces,
selects or moves along the batch or sequence axis (mean pooling, CLS selection, a MatMul between
two activations) would mix requests, and must run on per-request rows.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite.patterns.attention import is_constant

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


def token_dims(graph: gs.Graph, input_name: str) -> list:
    return list(next(t for t in graph.inputs if t.name == input_name).shape[:2])


def is_token_major(tensor: gs.Tensor, dims: list) -> bool:
    """Does `tensor` lead with the packed [batch, seq] axes?"""
    return tensor.shape is not None and len(tensor.shape) >= 2 and list(tensor.shape[:2]) == dims


def constant_ints(tensor: gs.Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor (initializer or Constant node), else None."""
    if tensor is not None and tensor.inputs and tensor.inputs[0].op == "Constant":
        tensor = tensor.inputs[0].attrs.get("value")
    if isinstance(tensor, gs.Constant):
        return [int(v) for v in np.asarray(tensor.values).reshape(-1)]
    return None


def _normalized(axes: list[int], rank: int) -> set[int]:
    return {a + rank if a < 0 else a for a in axes}


def classify(node: gs.Node, tensor: gs.Tensor, dims: list) -> str:
    """How `node` treats its token-major input `tensor`: per token, mixing tokens, or unknown."""
    rank = len(tensor.shape)
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
