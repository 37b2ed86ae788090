"""unfuse_ort: onnxruntime's fused transformer ops back into the standard ONNX an exporter writes.

onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`, which
optimum's ORTOptimizer runs) and onnxruntime's own graph optimizations (a model saved from a
session) fuse a BERT-like encoder into `com.microsoft` ops. Packing needs the attention as exporters
write it (`patterns/attention.py`) and a position-id computation it can turn into an input
(`export_position_ids`), so this pass, first in the default pipeline whenever position ids are
exported or a model is packed, rewrites every such op into standard ops. Each rewrite follows the
op's definition in onnxruntime's contrib-operator documentation (docs/ContribOperators.md) and its
CPU kernel:

| op | becomes |
|---|---|
| EmbedLayerNormalization | `Gather` of the word, position and segment tables, summed (`embedding_sum`), then layer normalization; position ids: its `position_ids` input, else `Range(0, seq)` over the token ids, as exporters compute them |
| Attention | Q, K and V projections (the packed weights and bias split per projection), heads by Reshape / Transpose, `MatMul(Q, K^T)` -> `Mul(scale)` [-> `Add(attention_bias)`] -> `Add(mask)` -> `Softmax` -> `MatMul(P, V)`, heads merged |
| MultiHeadAttention | the same from its query, key and value inputs (the bias added to each) |
| SkipLayerNormalization, SkipSimplifiedLayerNormalization | `Add(input, skip[, bias])` (`input_skip_bias_sum`), then layer / RMS normalization |
| BiasGelu, Gelu | `x * 0.5 * (1 + Erf(x / sqrt(2)))` (of `A + B`) |
| FastGelu | the tanh approximation `x (1 + Tanh(x (0.7978845608 + 0.0356774081 x^2))) 0.5` (of `X + bias`) |
| QuickGelu | `x * Sigmoid(alpha x)` |
| FusedMatMul | `MatMul` (of Transposes for transA / transB), `Mul(alpha)` |
| LayerNormalization before opset 17, SimplifiedLayerNormalization (onnxruntime's, ONNX domain) | the normalization by ReduceSum, Sub, Sqrt, Div |

Layer normalization is `LayerNormalization` from opset 17 on, else spelled out as above.

Masks: fused attention takes its padding mask as `mask_index`, in one of the forms onnxruntime's
optimizer writes: per-row lengths (`EmbedLayerNormalization`'s `mask_index` output, or
`ReduceSum(mask, 1)`; onnxruntime requires right padding for them) or the 0/1 mask itself, each
cast to int32. The mask is traced back to the `[batch, seq]` graph input it comes from and rebuilt
from that input as exporters do, `(1 - mask) * mask_filter_value` as `[batch, 1, 1, seq]`, added to
the scaled scores: for right-padded 0/1 masks all forms hide the same keys, and the packing passes
find the mask by the input it reads. A mask of another origin or form (3-D, 4-D, left-padding
indices), causal (`unidirectional`) or rotary attention, past state, outputs onnxruntime's CPU
kernels do not compute, and any other com.microsoft op are refused naming the node.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.patterns.attention import constant_array, producer

ADVICE = "pack the model as exported, before onnxruntime's transformer optimizer"
ENCODERS_ONLY = "packing is for bidirectional encoders"
# FastGelu's constants (onnxruntime's CPU kernel): sqrt(2 / pi) and 0.044715 * sqrt(2 / pi).
TANH_ALPHA = math.sqrt(2 / math.pi)
TANH_BETA = 0.044715 * TANH_ALPHA
# Attributes' defaults where onnxruntime's schemas give them.
SKIP_EMBED_EPSILON = 1e-12  # SkipLayerNormalization, SkipSimplifiedLayerNormalization, EmbedLayerNormalization
LAYER_NORM_EPSILON = 1e-5  # LayerNormalization, SimplifiedLayerNormalization
MASK_FILTER_VALUE = -10000.0
QUICK_GELU_ALPHA = 1.702


@register_pass("unfuse_ort")
class UnfuseOrt(Pass):
    """Rewrite onnxruntime's fused transformer ops (com.microsoft) into standard ONNX, for packing."""

    accepts_onnxruntime_ops = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused = [node for node in graph.nodes if is_onnxruntime_op(node, graph.opset)]
        if not fused:
            return PassResult(changed=False, message="no onnxruntime fused ops; model unchanged")
        unknown = next((node for node in fused if node.op not in REWRITES), None)
        if unknown is not None:
            raise PoprtError(
                f"node '{unknown.name}' is onnxruntime's {unknown.op} ({unknown.domain or 'ONNX domain'}), which unfuse_ort does "
                f"not turn into standard ONNX; {ADVICE}, or optimize it with that fusion off"
            )
        builder = _Builder(graph)
        outputs = {id(t) for t in graph.outputs}
        # The attention ops first: they read their mask through EmbedLayerNormalization's mask_index;
        # FusedMatMul last: its operands' ranks may need shape inference, which the other ops would stop.
        for node in sorted(fused, key=lambda n: ORDER.get(n.op, 1)):
            REWRITES[node.op](builder, _Fused(node, outputs))
        if not any(node.domain == ir.ORT_DOMAIN for node in graph.nodes):
            graph.import_domains = [d for d in graph.import_domains or [] if d.domain != ir.ORT_DOMAIN] or None
        counts = Counter(node.op for node in fused)
        return PassResult(changed=True, message="rewrote " + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))


def is_onnxruntime_op(node: gs.Node, opset: int) -> bool:
    """A com.microsoft op, or one of onnxruntime's own ops of the ONNX domain at an opset ONNX lacks it."""
    if node.domain == ir.ORT_DOMAIN:
        return True
    return node.domain in (None, "", "ai.onnx") and node.op in ir.ONNXRUNTIME_ONNX_OPS and not ir.is_onnx_op(node.op, opset)


class _Fused:
    """A fused node taken out of the graph: its inputs (None where omitted), its outputs (None where
    nothing reads them), its attributes."""

    def __init__(self, node: gs.Node, graph_outputs: set[int]) -> None:
        self.name, self.op, self.attrs = node.name, node.op, dict(node.attrs)
        self.inputs = [None if _omitted(t) else t for t in node.inputs]
        self.outputs = [t if t.outputs or id(t) in graph_outputs else None for t in node.outputs]
        self.names = [t.name for t in node.outputs]
        self.node = node

    def input(self, index: int) -> gs.Tensor | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def output(self, index: int) -> gs.Variable | None:
        return self.outputs[index] if index < len(self.outputs) else None

    def refuse(self, why: str, advice: str = ADVICE) -> PoprtError:
        return PoprtError(f"{self.op} node '{self.name}' {why}; {advice}")

    def refuse_outputs(self, indices: tuple[int, ...], why: str, advice: str = ADVICE) -> None:
        """Refuse the node if any of its outputs `indices` is used; `why` holds `{}` for the output's name."""
        used = [self.names[i] for i in indices if self.output(i) is not None]
        if used:
            raise self.refuse(why.format(used[0]), advice)

    def constant(self, index: int, what: str) -> np.ndarray:
        tensor = self.input(index)
        value = constant_array(tensor)
        if value is None:
            raise self.refuse(f"takes its {what} from '{tensor.name}', computed in the graph; unfuse_ort splits only constant {what}")
        return value

    def detach(self, graph: gs.Graph) -> None:
        """Take the node out of the graph; its output tensors wait for the nodes that will write them."""
        self.node.inputs.clear()
        self.node.outputs.clear()
        del graph.nodes[next(i for i, node in enumerate(graph.nodes) if node is self.node)]


def _omitted(tensor: gs.Tensor | None) -> bool:
    return tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name)


class _Builder:
    """Adds standard ops to the graph, named after the node they replace."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.unique = ir.FreshNames(graph)
        self.masks: dict[tuple, gs.Variable] = {}
        self.positions: dict[int, gs.Variable] = {}
        self.prefix = ""
        self.inferred = False

    def rank(self, tensor: gs.Tensor) -> int | None:
        """`tensor`'s rank (`_rank`), after onnx shape inference of the graph if need be (once)."""
        if _rank(tensor) is None and not self.inferred:
            self.graph.cleanup().toposort()
            ir.infer_shapes_in_place(self.graph)
            self.inferred = True
        return _rank(tensor)


    def op(self, op: str, inputs: list, attrs: dict | None = None, out: gs.Variable | None = None, dtype=None) -> gs.Variable:
        """One node of `op`; it writes `out` (an output of the fused node) or a new tensor."""
        if out is None:
            out = gs.Variable(self.unique(f"{self.prefix}/{op}_output"), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self.unique(f"{self.prefix}/{op}"), attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    def const(self, value, dtype=None) -> gs.Constant:
        return gs.Constant(self.unique(f"{self.prefix}/const"), np.asarray(value, dtype=dtype))

    # ops spelled out ---------------------------------------------------------------------------

    def mean_last(self, x: gs.Tensor, size: int, dtype) -> gs.Variable:
        """The mean over the last axis, kept: ReduceSum (axes as an input at every opset poprt-lite takes) / size."""
        total = self.op("ReduceSum", [x, self.const([-1], np.int64)], {"keepdims": 1})
        return self.op("Div", [total, self.const(size, dtype)])

    def layer_norm(self, x: gs.Tensor, gamma: gs.Tensor, beta: gs.Tensor | None, epsilon: float, out: gs.Variable | None) -> gs.Variable:
        """`(x - mean) / sqrt(var + epsilon) * gamma + beta` over the last axis."""
        if ir.is_onnx_op("LayerNormalization", self.graph.opset):
            inputs = [x, gamma] + ([beta] if beta is not None else [])
            return self.op("LayerNormalization", inputs, {"axis": -1, "epsilon": float(epsilon)}, out)
        size, dtype = _size_and_dtype(gamma)
        mean = self.mean_last(x, size, dtype)
        centred = self.op("Sub", [x, mean])
        variance = self.mean_last(self.op("Mul", [centred, centred]), size, dtype)
        deviation = self.op("Sqrt", [self.op("Add", [variance, self.const(epsilon, dtype)])])
        normed = self.op("Div", [centred, deviation])
        if beta is None:
            return self.op("Mul", [normed, gamma], out=out)
        return self.op("Add", [self.op("Mul", [normed, gamma]), beta], out=out)

    def rms_norm(self, x: gs.Tensor, gamma: gs.Tensor, epsilon: float, out: gs.Variable | None) -> gs.Variable:
        """`x / sqrt(mean(x^2) + epsilon) * gamma` over the last axis (SimplifiedLayerNormalization)."""
        size, dtype = _size_and_dtype(gamma)
        mean_square = self.mean_last(self.op("Mul", [x, x]), size, dtype)
        root = self.op("Sqrt", [self.op("Add", [mean_square, self.const(epsilon, dtype)])])
        return self.op("Mul", [self.op("Div", [x, root]), gamma], out=out)

    def gelu(self, x: gs.Tensor, dtype, out: gs.Variable | None) -> gs.Variable:
        """The erf GELU, as torch.onnx writes it: `x * (1 + Erf(x / sqrt(2))) * 0.5`."""
        erf = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2), dtype)])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.const(1, dtype)])]), self.const(0.5, dtype)], out=out)

    def tanh_gelu(self, x: gs.Tensor, dtype, out: gs.Variable | None) -> gs.Variable:
        """FastGelu: `x * (1 + Tanh(x * (alpha + beta * x^2))) * 0.5`."""
        inner = self.op("Add", [self.op("Mul", [self.op("Mul", [x, x]), self.const(TANH_BETA, dtype)]), self.const(TANH_ALPHA, dtype)])
        tanh = self.op("Tanh", [self.op("Mul", [x, inner])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [tanh, self.const(1, dtype)])]), self.const(0.5, dtype)], out=out)

    def add_bias(self, x: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        return x if bias is None else self.op("Add", [x, bias])

    # attention ---------------------------------------------------------------------------------

    def padding_mask(self, fused: _Fused, mask_index: gs.Tensor | None, dtype) -> gs.Variable | None:
        """The additive mask `[B, 1, 1, S]` of the attention-mask input `mask_index` comes from (None: no mask)."""
        source = _mask_input(fused, mask_index) if mask_index is not None else None
        if source is None:
            return None
        fill = float(fused.attrs.get("mask_filter_value", MASK_FILTER_VALUE))
        key = (id(source), fill, np.dtype(dtype).str)
        if key not in self.masks:
            prefix, self.prefix = self.prefix, f"{source.name}/additive_mask"
            mask = self.op("Cast", [source], {"to": _onnx_type(dtype)})
            hidden = self.op("Mul", [self.op("Sub", [self.const(1, dtype), mask]), self.const(fill, dtype)])
            self.masks[key] = self.op("Unsqueeze", [hidden, self.const([1, 2], np.int64)])
            self.prefix = prefix
        return self.masks[key]

    def attend(
        self, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, heads: int, head_sizes: tuple[int, int], scale: float,
        terms: list[gs.Tensor], dtype, out: gs.Variable,
    ) -> None:
        """Multi-head attention of per-token `q`, `k`, `v` ([B, S, hidden]) with `terms` added to the scaled scores."""
        qk_size, v_size = head_sizes
        query = self.op("Transpose", [self.op("Reshape", [q, self.const([0, 0, heads, qk_size], np.int64)])], {"perm": [0, 2, 1, 3]})
        key_t = self.op("Transpose", [self.op("Reshape", [k, self.const([0, 0, heads, qk_size], np.int64)])], {"perm": [0, 2, 3, 1]})
        value = self.op("Transpose", [self.op("Reshape", [v, self.const([0, 0, heads, v_size], np.int64)])], {"perm": [0, 2, 1, 3]})
        scores = self.op("Mul", [self.op("MatMul", [query, key_t]), self.const(scale, dtype)])
        for term in terms:
            scores = self.op("Add", [scores, term])
        probabilities = self.op("Softmax", [scores], {"axis": -1})
        context = self.op("Transpose", [self.op("MatMul", [probabilities, value])], {"perm": [0, 2, 1, 3]})
        self.op("Reshape", [context, self.const([0, 0, heads * v_size], np.int64)], out=out)

    def token_positions(self, ids: gs.Tensor) -> gs.Variable:
        """`[1, S]` int64 positions 0..S-1 of the token ids `ids` ([B, S]), as DistilBERT's export computes them."""
        if id(ids) not in self.positions:
            shape = self.op("Shape", [ids])
            seq = self.op("Gather", [shape, self.const(1, np.int64)], {"axis": 0})
            positions = self.op("Range", [self.const(0, np.int64), seq, self.const(1, np.int64)])
            self.positions[id(ids)] = self.op("Unsqueeze", [positions, self.const([0], np.int64)])
        return self.positions[id(ids)]


def _size_and_dtype(gamma: gs.Tensor) -> tuple[int, np.dtype]:
    value = constant_array(gamma)
    if value is None or value.ndim != 1:
        raise PoprtError(f"the normalization scale '{gamma.name}' is not a constant vector; unfuse_ort spells out normalizations only with constant scales")
    return value.shape[0], value.dtype


def _float_dtype(*tensors: gs.Tensor | None):
    """The float type of the first of `tensors` whose type is known (float32 when none is)."""
    for tensor in tensors:
        dtype = getattr(tensor, "dtype", None) if tensor is not None else None
        if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
            return np.dtype(dtype)
    return np.dtype(np.float32)


def _uncast(tensor: gs.Tensor) -> gs.Tensor:
    """`tensor` before the integer-to-integer Casts onnxruntime's optimizer puts on ids (int64 to int32)."""
    writer = producer(tensor, ("Cast",))
    while writer is not None and _is_integer(writer.inputs[0]) and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(writer.attrs["to"]), np.integer):
        tensor = writer.inputs[0]
        writer = producer(tensor, ("Cast",))
    return tensor


def _is_integer(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.integer)


def _onnx_type(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _mask_input(fused: _Fused, mask_index: gs.Tensor) -> gs.Variable | None:
    """The `[batch, seq]` graph input that `mask_index` is computed from, through Casts and one of
    the lengths computations (EmbedLayerNormalization's mask_index, `ReduceSum(mask, axes=[1])`);
    None when the lengths come from an EmbedLayerNormalization without a mask (all keys then take
    the same filter value, which Softmax ignores)."""
    tensor, lengths = mask_index, False
    while (writer := producer(tensor)) is not None:
        if writer.op == "Cast":
            tensor = writer.inputs[0]
        elif not lengths and writer.op == "EmbedLayerNormalization" and writer.outputs.index(tensor) == 1:
            mask = writer.inputs[7] if len(writer.inputs) > 7 and not _omitted(writer.inputs[7]) else None
            if mask is None:
                return None
            tensor, lengths = mask, True
        elif not lengths and writer.op == "ReduceSum" and _reduces_axis_1(writer):
            tensor, lengths = writer.inputs[0], True
        else:
            raise fused.refuse(
                f"takes its mask '{mask_index.name}' from {writer.op} node '{writer.name}'; unfuse_ort rebuilds the masks that come "
                f"from a [batch, sequence] attention-mask input (0/1, or its lengths)"
            )
    if not isinstance(tensor, gs.Variable) or tensor.shape is None or len(tensor.shape) != 2:
        raise fused.refuse(f"takes its mask from '{tensor.name}', which is not a [batch, sequence] graph input")
    return tensor


def _reduces_axis_1(node: gs.Node) -> bool:
    axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("axes", []))
    return axes is not None and axes.reshape(-1).tolist() in ([1], [-1]) and node.attrs.get("keepdims", 1) == 0


def _rank(tensor: gs.Tensor) -> int | None:
    """`tensor`'s rank, from its shape or the Transpose / constant-shape Reshape that writes it."""
    if tensor.shape is not None:
        return len(tensor.shape)
    writer = producer(tensor, ("Transpose", "Reshape"))
    if writer is not None and writer.op == "Transpose" and "perm" in writer.attrs:
        return len(writer.attrs["perm"])
    target = constant_array(writer.inputs[1]) if writer is not None and writer.op == "Reshape" else None
    return int(target.size) if target is not None else None


# the rewrites, one per op ------------------------------------------------------------------------


def _start(builder: _Builder, fused: _Fused) -> None:
    fused.detach(builder.graph)
    builder.prefix = fused.name or fused.op


def _embed_layer_norm(builder: _Builder, fused: _Fused) -> None:
    ids, segments, words, positions, segment_table, gamma, beta, mask, position_ids = (fused.input(i) for i in range(9))
    _start(builder, fused)
    token_ids = _uncast(ids)
    position_ids = _uncast(position_ids) if position_ids is not None else builder.token_positions(token_ids)
    total = builder.op("Gather", [words, token_ids], {"axis": 0})
    total = builder.op("Add", [total, builder.op("Gather", [positions, position_ids], {"axis": 0})], out=None if segments is not None else fused.output(2))
    if segments is not None:
        total = builder.op("Add", [total, builder.op("Gather", [segment_table, _uncast(segments)], {"axis": 0})], out=fused.output(2))
    builder.layer_norm(total, gamma, beta, fused.attrs.get("epsilon", SKIP_EMBED_EPSILON), fused.output(0))
    if fused.output(1) is not None:  # lengths for a consumer other than the attention ops: what the kernel counts
        if mask is None:
            raise fused.refuse(f"gives its mask_index output '{fused.output(1).name}' (zeros: it has no mask input) to a node unfuse_ort does not rewrite")
        ones = builder.op("Cast", [builder.op("Equal", [mask, builder.const(1, np.int32)])], {"to": onnx.TensorProto.INT32})
        builder.op("ReduceSum", [ones, builder.const([1], np.int64)], {"keepdims": 0}, out=fused.output(1))


def _attention(builder: _Builder, fused: _Fused) -> None:
    x, _, _, mask_index, past, attention_bias, past_length = (fused.input(i) for i in range(7))
    _refuse_decoder(fused, past is not None or past_length is not None)
    fused.refuse_outputs((1,), "returns a present state '{}' (a decoder's cache)", ENCODERS_ONLY)
    weights = fused.constant(1, "Q, K, V weights")
    bias = fused.constant(2, "Q, K, V bias") if fused.input(2) is not None else None
    sizes = [int(s) for s in fused.attrs.get("qkv_hidden_sizes", [])] or [weights.shape[1] // 3] * 3
    dtype = _float_dtype(fused.input(1))
    mask = builder.padding_mask(fused, mask_index, dtype)
    _start(builder, fused)
    bounds = np.cumsum([0, *sizes])
    q, k, v = (
        builder.add_bias(builder.op("MatMul", [x, builder.const(weights[:, a:b])]), builder.const(bias[a:b]) if bias is not None else None)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )
    _attend(builder, fused, (q, k, v), sizes, attention_bias, mask, dtype)


def _multi_head_attention(builder: _Builder, fused: _Fused) -> None:
    query, key, value, _, mask_index, attention_bias = (fused.input(i) for i in range(6))
    _refuse_decoder(fused, any(fused.input(i) is not None for i in range(6, 10)))
    fused.refuse_outputs((1, 2, 3), "returns a present key / value or its scores ('{}')", ENCODERS_ONLY)
    if key is None or value is None or any(_rank(t) not in (3, None) for t in (query, key, value)):
        raise fused.refuse("takes packed Q/K/V or a key cache; unfuse_ort rewrites separate [batch, sequence, hidden] query, key and value")
    sizes = [_hidden_size(fused, t) for t in (query, key, value)]
    bias = fused.constant(3, "Q, K, V bias") if fused.input(3) is not None else None
    dtype = _float_dtype(query, fused.input(3))
    mask = builder.padding_mask(fused, mask_index, dtype)
    _start(builder, fused)
    bounds = np.cumsum([0, *sizes])
    q, k, v = (
        builder.add_bias(t, builder.const(bias[a:b]) if bias is not None else None)
        for t, a, b in zip((query, key, value), bounds[:-1], bounds[1:], strict=True)
    )
    _attend(builder, fused, (q, k, v), sizes, attention_bias, mask, dtype)


def _refuse_decoder(fused: _Fused, has_past: bool) -> None:
    if fused.attrs.get("unidirectional", 0):
        raise fused.refuse("is unidirectional (causal, a decoder's attention)", ENCODERS_ONLY)
    if fused.attrs.get("do_rotary", 0):
        raise fused.refuse("applies rotary embeddings inside the op", ADVICE)
    if has_past:
        raise fused.refuse("takes a past state (a decoder's cache)", ENCODERS_ONLY)


def _hidden_size(fused: _Fused, tensor: gs.Tensor) -> int:
    """The last dim of `tensor`: from its shape, or the constant weight of the MatMul writing it."""
    if tensor.shape is not None and isinstance(tensor.shape[-1], int):
        return tensor.shape[-1]
    writer = producer(tensor, ("MatMul",))
    weight = constant_array(writer.inputs[1]) if writer is not None else None
    if weight is None:
        raise fused.refuse(f"takes '{tensor.name}', whose hidden size is unknown (no shape, not a MatMul with a constant weight)")
    return weight.shape[-1]


def _attend(builder: _Builder, fused: _Fused, qkv: tuple, sizes: list[int], attention_bias, mask, dtype) -> None:
    heads = int(fused.attrs["num_heads"])
    qk_size, v_size = sizes[0] // heads, sizes[2] // heads
    scale = float(fused.attrs.get("scale", 0.0)) or 1 / math.sqrt(qk_size)
    terms = [t for t in (attention_bias, mask) if t is not None]
    builder.attend(*qkv, heads, (qk_size, v_size), scale, terms, dtype, fused.output(0))


def _skip_layer_norm(builder: _Builder, fused: _Fused) -> None:
    simplified = fused.op == "SkipSimplifiedLayerNormalization"
    x, skip, gamma = fused.input(0), fused.input(1), fused.input(2)
    beta, bias = (None, fused.input(3)) if simplified else (fused.input(3), fused.input(4))
    fused.refuse_outputs((1, 2), "returns its mean or inv_std_var '{}', which onnxruntime's CPU kernel does not compute")
    _start(builder, fused)
    total = builder.op("Add", [x, skip], out=fused.output(3) if bias is None else None)
    if bias is not None:
        total = builder.op("Add", [total, bias], out=fused.output(3))
    epsilon = fused.attrs.get("epsilon", SKIP_EMBED_EPSILON)
    if simplified:
        builder.rms_norm(total, gamma, epsilon, fused.output(0))
    else:
        builder.layer_norm(total, gamma, beta, epsilon, fused.output(0))


def _layer_norm(builder: _Builder, fused: _Fused) -> None:
    """onnxruntime's LayerNormalization / SimplifiedLayerNormalization of the ONNX domain, at opsets before ONNX's."""
    fused.refuse_outputs((1, 2), "returns its training output '{}' (mean or inverse standard deviation)")
    axis = fused.attrs.get("axis", -1)
    if axis != -1 and axis != (_rank(fused.input(0)) or 0) - 1:
        raise fused.refuse(f"normalizes from axis {axis}; unfuse_ort spells out the normalization over the last axis")
    epsilon = fused.attrs.get("epsilon", LAYER_NORM_EPSILON)
    _start(builder, fused)
    if fused.op == "SimplifiedLayerNormalization":
        builder.rms_norm(fused.input(0), fused.input(1), epsilon, fused.output(0))
    else:
        builder.layer_norm(fused.input(0), fused.input(1), fused.input(2), epsilon, fused.output(0))


def _gelu(builder: _Builder, fused: _Fused) -> None:
    """BiasGelu (A + B), Gelu (X): the erf GELU."""
    dtype = _float_dtype(fused.input(1), fused.input(0))
    _start(builder, fused)
    builder.gelu(builder.add_bias(fused.input(0), fused.input(1)), dtype, fused.output(0))


def _fast_gelu(builder: _Builder, fused: _Fused) -> None:
    """FastGelu (X [+ bias]): the tanh approximation."""
    x, bias = fused.input(0), fused.input(1)
    dtype = _float_dtype(bias, x)
    _start(builder, fused)
    builder.tanh_gelu(builder.add_bias(x, bias), dtype, fused.output(0))


def _quick_gelu(builder: _Builder, fused: _Fused) -> None:
    x, alpha = fused.input(0), float(fused.attrs.get("alpha", QUICK_GELU_ALPHA))
    dtype = _float_dtype(x)
    _start(builder, fused)
    scaled = builder.op("Mul", [x, builder.const(alpha, dtype)]) if alpha != 1 else x
    builder.op("Mul", [x, builder.op("Sigmoid", [scaled])], out=fused.output(0))


def _fused_matmul(builder: _Builder, fused: _Fused) -> None:
    if fused.attrs.get("transBatchA", 0) or fused.attrs.get("transBatchB", 0):
        raise fused.refuse("transposes batch dimensions (transBatchA / transBatchB)", "optimize the model with onnxruntime's basic graph optimizations only")
    operands = []
    for index, flag in ((0, "transA"), (1, "transB")):
        tensor = fused.input(index)
        if fused.attrs.get(flag, 0):
            rank = builder.rank(tensor)
            if rank is None:
                raise fused.refuse(f"transposes '{tensor.name}' ({flag}), whose rank is unknown", "optimize the model with onnxruntime's basic graph optimizations only")
            operands.append((tensor, [*range(rank - 2), rank - 1, rank - 2]))
        else:
            operands.append((tensor, None))
    alpha = float(fused.attrs.get("alpha", 1.0))
    dtype = _float_dtype(fused.input(0), fused.input(1))
    _start(builder, fused)
    a, b = (builder.op("Transpose", [t], {"perm": perm}) if perm else t for t, perm in operands)
    if alpha == 1:
        builder.op("MatMul", [a, b], out=fused.output(0))
    else:
        builder.op("Mul", [builder.op("MatMul", [a, b]), builder.const(alpha, dtype)], out=fused.output(0))


ORDER = {"Attention": 0, "MultiHeadAttention": 0, "FusedMatMul": 2}  # rewrite order; other ops: 1
REWRITES: dict[str, Callable[[_Builder, _Fused], None]] = {
    "EmbedLayerNormalization": _embed_layer_norm,
    "Attention": _attention,
    "MultiHeadAttention": _multi_head_attention,
    "SkipLayerNormalization": _skip_layer_norm,
    "SkipSimplifiedLayerNormalization": _skip_layer_norm,
    "LayerNormalization": _layer_norm,
    "SimplifiedLayerNormalization": _layer_norm,
    "BiasGelu": _gelu,
    "Gelu": _gelu,
    "FastGelu": _fast_gelu,
    "QuickGelu": _quick_gelu,
    "FusedMatMul": _fused_matmul,
}
