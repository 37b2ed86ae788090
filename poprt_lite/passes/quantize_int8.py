"""quantize_int8: MatMuls with constant weights in 8-bit integers, activations per token (`--precision int8`).

Each `MatMul(x, W)` with a constant float32 `W [K, N]` becomes onnxruntime's
`com.microsoft::MatMulIntegerToFloat`: an integer u8 x s8 product (VNNI / AMX on x86) turned back
into float32 by two scales; the MatMul's bias Add stays as it was. MatMuls that read the same
activation (Q, K and V) share its quantization. Everything else (attention's products of two
activations, Softmax, LayerNorm, GELU, pooling) stays float32.

- Activations, per token: each row `x` of the `[..., K]` input (one token of the packed batch) gets
  its own scale `max|x| / 127` and becomes `round(x / scale) + 128` in uint8 (`QuantizeLinear`
  along the rows). A row's scale reads that row only, so a request's answer depends on its own
  tokens and not on what else is packed into the batch. (onnxruntime.quantization's
  `quantize_dynamic` takes one scale over the whole tensor, `DynamicQuantizeLinear`: there a
  request's answer changes with its batch.)
- Weights, per output channel: column n of `W` becomes `round(W[:, n] / s[n])` in int8, with
  `s[n] = max|W[:, n]| / 127`.
- Outlier channels (SmoothQuant): a few channels of a transformer's activations are one or two
  orders of magnitude larger than the rest in every token (MiniLM's channel 99 after LayerNorm:
  up to 28 against a median channel maximum of 1.8), and a per-token scale set by them leaves the
  other channels a handful of levels. Each activation is divided per channel by
  `m[k] = sqrt(max|x[:, k]| / max|W[k, :]|)` before it is quantized and the rows of `W` multiplied
  by it, which leaves `x W` unchanged and splits the range between activation and weight. The
  channel maxima `max|x[:, k]|` come from running the model on `CALIBRATION_LENGTHS` requests of
  random token ids (seed 0; no data set), laid out as the graph takes them (`calibration_feeds`).
- attention_mask mode: a row holds several requests and each attention Softmax runs over the whole
  row, its keys masked to the request's own. onnxruntime's Softmax sums a row in vector lanes, so a
  request's probabilities change in the last bit with its offset in the row (1e-7); in float32 that
  is noise, but quantizing rounds to the nearest level, and a last-bit change that crosses a
  rounding boundary moves a whole level: on the real MiniLM a request's vector changed by 4e-3 with
  its batch. There each Softmax becomes `e = Exp(x - max x)` over `e @ ones` (`_sum_in_key_order`):
  the product adds the keys one after another, the masked ones as exact zeros, so the sum is the same
  wherever the request lies in the row (onnxruntime's float32 MatMul adds along a block of 256 keys
  in order: rows up to 256 tokens, what `tests/passes/test_quantize_int8.py` checks).

Why this kernel and not `MatMulInteger` or `MatMulNBits`, and the accuracy: README "int8".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from poprt_lite import ir, vocab
from poprt_lite.errors import PoprtError, one_line
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import MetaKey, PackMode, Role

ORT_DOMAIN = "com.microsoft"
KERNEL = "MatMulIntegerToFloat"
LEVELS = 127  # symmetric int8: -127..127 (uint8 1..255 around ZERO_POINT)
ZERO_POINT = 128
# A row of zeros gets this scale instead of 0 (QuantizeLinear divides by it; the row stays 0).
SMALLEST_SCALE = np.float32(1e-30)
# Calibration requests: their lengths (capped at what one request may hold) and the first token id
# drawn (ids below are special tokens: padding, CLS, SEP, unknown in BERT-like vocabularies).
CALIBRATION_LENGTHS = (16, 24, 32, 48, 64, 96, 128, 128)
FIRST_ORDINARY_ID = 1000
# An activation whose calibrated minimum lies above -ONE_SIDED x its maximum (GELU's or ReLU's outputs:
# MiniLM's -0.17 against up to 25) is quantized with a zero point per row: twice the levels of a
# symmetric range. (Its correction costs a pass over the product, which others are not worth.)
ONE_SIDED = 0.1


@register_pass("quantize_int8")
class QuantizeInt8(Pass):
    """MatMuls with constant weights in int8: weights per channel, activations per token, outlier channels smoothed (onnxruntime's MatMulIntegerToFloat)."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        groups: dict[str, list[gs.Node]] = defaultdict(list)
        activations: dict[str, gs.Tensor] = {}
        for node in graph.nodes:
            if _weight(node) is not None:
                groups[node.inputs[0].name].append(node)
                activations[node.inputs[0].name] = node.inputs[0]
        if not groups:
            return PassResult(changed=False, message="no MatMul with constant float32 weights")
        ranges = channel_ranges(graph, ctx.metadata, list(groups))
        one_sided = 0
        for name, nodes in groups.items():
            weights = [_weight(node) for node in nodes]
            lowest, highest = ranges[name]
            smoothing = _smoothing(np.maximum(-lowest, highest), np.max([np.abs(w).max(axis=1) for w in weights], axis=0))
            asymmetric = bool(lowest.min() > -ONE_SIDED * highest.max())
            one_sided += asymmetric
            x = _divided(graph, activations[name], smoothing)
            rows = _quantize_rows(graph, x, len(smoothing), asymmetric)
            for node, weight in zip(nodes, weights, strict=True):
                _replace(graph, node, weight * smoothing[:, None], rows)
        pack = vocab.pack_spec_of(ctx.metadata)
        softmaxes = _sum_in_key_order(graph) if pack is not None and pack.mode == PackMode.attention_mask else 0
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        count = sum(len(nodes) for nodes in groups.values())
        summed = f"; {softmaxes} Softmaxes summed in key order" if softmaxes else ""
        return PassResult(
            changed=True,
            message=f"{count} MatMuls to int8 ({len(groups)} activations quantized per token, {one_sided} of them one-sided: with a zero point){summed}",
        )


def _weight(node: gs.Node) -> np.ndarray | None:
    """The float32 [K, N] weights of a `MatMul(activation, weights)`, else None."""
    if node.op != "MatMul" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
        return None
    activation, weight = node.inputs
    if isinstance(activation, gs.Constant) or not isinstance(weight, gs.Constant):
        return None
    if weight.dtype != np.float32 or len(weight.shape) != 2 or activation.dtype not in (None, np.float32):
        return None
    return np.asarray(weight.values)


def _smoothing(activation_max: np.ndarray, weight_max: np.ndarray) -> np.ndarray:
    """SmoothQuant's per-channel divisor with migration strength 1/2 (1 where a side is all zero)."""
    usable = (activation_max > 0) & (weight_max > 0)
    ratio = np.where(usable, activation_max / np.where(usable, weight_max, 1), 1)
    return np.sqrt(ratio).astype(np.float32)


# ---------------------------------------------------------------------------------- calibration


def channel_ranges(graph: gs.Graph, metadata: dict[str, str], names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The lowest and the highest value per channel (last axis) of each tensor in `names`, over the
    real tokens of the calibration requests, with the graph run by onnxruntime as it is now."""
    probe = graph.copy()
    probe.outputs = [probe.tensors()[name] for name in names]
    for tensor in probe.outputs:
        tensor.dtype, tensor.shape = np.float32, None
    probe.cleanup(remove_unused_graph_inputs=False).toposort()
    for tensor in probe.tensors().values():  # onnxruntime infers them; a sequence (a Loop's) has no gs type
        if isinstance(tensor, gs.Variable) and tensor not in probe.inputs and tensor not in probe.outputs:
            tensor.dtype, tensor.shape = None, None
    model = ir.Model(probe, onnx.ModelProto(ir_version=graph.ir_version or onnx.IR_VERSION)).to_proto()
    try:
        session = create_session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as exc:
        raise PoprtError(f"quantize_int8 could not run the model to calibrate its activations: {one_line(exc)}") from exc
    rng = np.random.default_rng(0)
    seen: dict[str, list[np.ndarray]] = defaultdict(list)
    for wanted in CALIBRATION_LENGTHS:
        feeds, slots, length = calibration_feeds(graph, metadata, wanted, rng)
        for name, value in zip(names, session.run(names, feeds), strict=True):
            rows = value.reshape(-1, value.shape[-1])
            seen[name].append(rows[:length] if len(rows) == slots else rows[:1])  # per token, else one row per request
    return {name: (np.concatenate(rows).min(axis=0), np.concatenate(rows).max(axis=0)) for name, rows in seen.items()}


def calibration_feeds(graph: gs.Graph, metadata: dict[str, str], wanted: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int, int]:
    """Feeds holding one request of random token ids, first in the batch, the rest padding, in the
    layout of any packing mode or none: the first `length` token slots are real (mask 1, position
    ids from the model's offset, `unpack_info` = [length, 0, ...]), every other value is 0. Returns
    the feeds, the token slots of the batch and `length` (`wanted`, capped at a row and at the
    packing's segment_max_size: what one request may hold). A graph without token ids gets
    standard normal floats in every slot."""
    pack = vocab.pack_spec_of(metadata)
    ids_input = next((t for t in graph.inputs if vocab.role_of(metadata, t.name) is Role.dynamic_input), None)
    if ids_input is None:
        feeds = {t.name: rng.standard_normal(_concrete(t.shape, wanted)).astype(t.dtype) for t in graph.inputs}
        slots = max((v.size // v.shape[-1] for v in feeds.values() if v.ndim), default=1)
        return feeds, slots, slots
    row = ids_input.shape[-1] if ids_input.shape and isinstance(ids_input.shape[-1], int) and ids_input.shape[-1] > 0 else wanted
    length = min(wanted, row, pack.segment_max_size if pack is not None else wanted)
    vocab_rows = vocab.int_of(metadata, MetaKey.vocab_size) or _table_rows(graph, ids_input) or 2
    offset = vocab.int_of(metadata, MetaKey.position_offset)
    feeds = {}
    for tensor in graph.inputs:
        role = vocab.role_of(metadata, tensor.name)
        values = np.zeros(_concrete(tensor.shape, 1 if role is Role.unpack_info else length), dtype=tensor.dtype)
        flat = values.reshape(-1)
        if role is Role.dynamic_input:
            flat[:length] = rng.integers(min(FIRST_ORDINARY_ID, vocab_rows // 2), vocab_rows, length)
        elif role is Role.attention_mask:
            flat[:length] = 1
        elif role is Role.position_ids:
            flat[:length] = offset + np.arange(length)
        elif role is Role.unpack_info:
            flat[0] = length
        feeds[tensor.name] = values
    return feeds, int(np.prod(feeds[ids_input.name].shape)), length


def _concrete(shape, last: int) -> tuple[int, ...]:
    """A declared shape with its symbolic dims set: the last to `last`, the others to 1."""
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in (shape or [])]
    if shape and not (isinstance(shape[-1], int) and shape[-1] > 0):
        dims[-1] = last
    return tuple(dims)


def _table_rows(graph: gs.Graph, ids_input: gs.Tensor) -> int | None:
    """The rows of the embedding table the token ids index (a Gather reading them), if any."""
    for node in ids_input.outputs:
        if node.op == "Gather" and len(node.inputs) == 2 and node.inputs[1] is ids_input and isinstance(node.inputs[0], gs.Constant):
            return int(node.inputs[0].shape[0])
    return None


# ---------------------------------------------------------------------------------- the rewrite


def _divided(graph: gs.Graph, x: gs.Tensor, divisor: np.ndarray) -> gs.Tensor:
    """`x / divisor` per channel (a Mul by its reciprocal)."""
    out = gs.Variable(ir.unique_name(graph, f"{x.name}_smoothed"), dtype=np.float32)
    reciprocal = gs.Constant(ir.unique_name(graph, f"{x.name}_smoothing"), (1 / divisor).astype(np.float32))
    graph.nodes.append(gs.Node("Mul", inputs=[x, reciprocal], outputs=[out]))
    return out


@dataclass(frozen=True)
class QuantizedRows:
    """An activation `[..., K]` quantized per row: `values` uint8, `scale` `[..., 1]`, and for
    one-sided rows `offset` `[..., 1]`: scale times the row's zero point, which the product's
    correction needs (`MatMulIntegerToFloat` takes one zero point for the whole tensor)."""

    values: gs.Tensor
    scale: gs.Tensor
    offset: gs.Tensor | None


class _Appender:
    """Appends nodes to `graph`, naming their outputs and constants `{prefix}_{suffix}` (made unique)."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix

    def node(self, op: str, inputs: list, suffix: str, dtype=np.float32, **attrs) -> gs.Variable:
        out = gs.Variable(ir.unique_name(self.graph, f"{self.prefix}_{suffix}"), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, inputs=inputs, outputs=[out], attrs=attrs))
        return out

    def const(self, suffix: str, values) -> gs.Constant:
        return gs.Constant(ir.unique_name(self.graph, f"{self.prefix}_{suffix}"), np.asarray(values))

    def bind(self):
        return self.node, self.const


def _quantize_rows(graph: gs.Graph, x: gs.Tensor, k: int, asymmetric: bool) -> QuantizedRows:
    """`x [..., K]` in uint8 per row (token): symmetric around ZERO_POINT, or with asymmetric, from
    the row's minimum to its maximum (zero included) with the row's own zero point."""
    node, const = _Appender(graph, x.name).bind()
    if graph.opset >= 18:
        last = const("last_axis", np.array([-1], np.int64))
        largest = node("ReduceMax", [x, last], "row_max", np.float32, keepdims=1)
        smallest = node("ReduceMin", [x, last], "row_min", np.float32, keepdims=1)
    else:
        largest = node("ReduceMax", [x], "row_max", np.float32, axes=[-1], keepdims=1)
        smallest = node("ReduceMin", [x], "row_min", np.float32, axes=[-1], keepdims=1)
    # two read-only reductions cost less than writing |x| first
    negated = node("Neg", [smallest], "row_min_negated", np.float32)
    if asymmetric:
        below = node("Max", [negated, const("zero", np.float32(0))], "row_below_zero", np.float32)
        span = node("Add", [node("Max", [largest, const("zero", np.float32(0))], "row_above_zero", np.float32), below], "row_span", np.float32)
        span = node("Max", [span, const("smallest", SMALLEST_SCALE * 2 * LEVELS)], "row_span_nonzero", np.float32)
        scale = node("Div", [span, const("levels", np.float32(2 * LEVELS + 1))], "row_scale", np.float32)
        zero_point = node("Round", [node("Div", [below, scale], "row_zero", np.float32)], "row_zero_rounded", np.float32)
        offset = node("Mul", [zero_point, scale], "row_offset", np.float32)
        zero_points = node("Cast", [node("Reshape", [zero_point, const("flat", np.array([-1], np.int64))], "row_zeros", np.float32)],
                           "row_zero_points", np.uint8, to=onnx.TensorProto.UINT8)
    else:
        magnitude = node("Max", [largest, negated, const("smallest", SMALLEST_SCALE * LEVELS)], "row_abs_max", np.float32)
        scale = node("Div", [magnitude, const("levels", np.float32(LEVELS))], "row_scale", np.float32)
        offset = None
    # QuantizeLinear's per-axis form: rows on axis 0 of a 2-D view, one scale and zero point each
    rows = node("Reshape", [x, const("token_rows_shape", np.array([-1, k], np.int64))], "token_rows", np.float32)
    flat_scale = node("Reshape", [scale, const("flat", np.array([-1], np.int64))], "row_scales", np.float32)
    if not asymmetric:
        count = node("Shape", [flat_scale], "row_count", np.int64)
        zero_points = node("ConstantOfShape", [count], "row_zero_points", np.uint8, value=onnx.numpy_helper.from_array(np.array([ZERO_POINT], np.uint8)))
    quantized_rows = node("QuantizeLinear", [rows, flat_scale, zero_points], "rows_uint8", np.uint8, axis=0)
    quantized = node("Reshape", [quantized_rows, node("Shape", [x], "shape", np.int64)], "uint8", np.uint8)
    return QuantizedRows(quantized, scale, offset)


def _replace(graph: gs.Graph, node: gs.Node, weight: np.ndarray, rows: QuantizedRows) -> None:
    """`node` (MatMul) -> MatMulIntegerToFloat on `rows` and `weight` quantized per column; for
    one-sided rows, minus each row's offset times the columns' sums (the zero point's share)."""
    column_scale = np.abs(weight).max(axis=0) / LEVELS
    column_scale = np.where(column_scale > 0, column_scale, 1).astype(np.float32)  # an all-zero column stays 0
    integers = np.clip(np.rint(weight / column_scale), -LEVELS, LEVELS).astype(np.int8)
    name = node.name or node.outputs[0].name
    zero_point = ZERO_POINT if rows.offset is None else 0
    inputs = [
        rows.values,
        gs.Constant(ir.unique_name(graph, f"{name}_weight_int8"), integers),
        rows.scale,
        gs.Constant(ir.unique_name(graph, f"{name}_weight_scale"), column_scale),
        gs.Constant(ir.unique_name(graph, f"{name}_zero_point"), np.array(zero_point, np.uint8)),
    ]
    outputs = list(node.outputs)
    node.outputs.clear()
    product = outputs[0]
    if rows.offset is not None:
        product = gs.Variable(ir.unique_name(graph, f"{name}_int8_product"), dtype=np.float32)
        sums = (column_scale * integers.astype(np.int64).sum(axis=0)).astype(np.float32)
        share = gs.Variable(ir.unique_name(graph, f"{name}_zero_point_share"), dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", inputs=[rows.offset, gs.Constant(ir.unique_name(graph, f"{name}_column_sums"), sums)], outputs=[share]))
        graph.nodes.append(gs.Node("Sub", inputs=[product, share], outputs=outputs))
    # ONNX's shape inference knows no com.microsoft op: a Cast to float32 types the product for it
    # (and for the ops after it); onnxruntime removes the Cast (CastElimination).
    integer_product = gs.Variable(ir.unique_name(graph, f"{name}_int8_output"))
    graph.nodes.append(gs.Node(KERNEL, name=ir.unique_name(graph, f"{name}_int8"), domain=ORT_DOMAIN, inputs=inputs, outputs=[integer_product]))
    graph.nodes.append(gs.Node("Cast", inputs=[integer_product], outputs=[product], attrs={"to": onnx.TensorProto.FLOAT}))


def _sum_in_key_order(graph: gs.Graph) -> int:
    """Each Softmax over the last axis -> `Exp(x - max x) / (Exp(x - max x) @ ones)`, whose sum
    does not depend on where a request's keys lie in the row (see the module docstring). Returns
    how many were rewritten (opset < 13 Softmax flattens its axes: left as it is)."""
    if graph.opset < 13:
        return 0
    softmaxes = [n for n in graph.nodes if n.op == "Softmax" and n.domain in (None, "", "ai.onnx") and n.attrs.get("axis", -1) == -1]
    for softmax in softmaxes:
        x, outputs = softmax.inputs[0], list(softmax.outputs)
        softmax.outputs.clear()
        node, const = _Appender(graph, x.name).bind()
        if graph.opset >= 18:
            largest = node("ReduceMax", [x, const("last_axis", np.array([-1], np.int64))], "max", keepdims=1)
        else:
            largest = node("ReduceMax", [x], "max", axes=[-1], keepdims=1)
        exp = node("Exp", [node("Sub", [x, largest], "shifted")], "exp")
        # a [keys, 1] column of ones, keys read from x at run time
        keys = node("Slice", [node("Shape", [x], "shape", np.int64), const("minus_one", np.array([-1], np.int64)), const("end", np.array([np.iinfo(np.int64).max], np.int64))], "keys", np.int64)
        column = node("Concat", [keys, const("one", np.array([1], np.int64))], "ones_shape", np.int64, axis=0)
        ones = node("ConstantOfShape", [column], "ones", value=onnx.numpy_helper.from_array(np.array([1], np.float32)))
        total = node("MatMul", [exp, ones], "sum")
        graph.nodes.append(gs.Node("Div", inputs=[exp, total], outputs=outputs))
    return len(softmaxes)
