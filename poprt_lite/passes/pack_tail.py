"""What the packing passes share after the encoder: pooling per request, and every output's layout.

Not a pass: `place_tail` is called by each packing pass once its attention blocks are rewritten,
with a `TailPlacement` saying how that mode pools a head (`pool`), whether it can bring a packed
per-token tensor to one row per request (`unpack`), what it does with the per-token outputs
(`token_output`), and its rows' leading dims (`rows`: request slots and row length,
`[max_valid_num, segment_max_size]`, or the batch's requests and longest request in token_stream).

1. Pooling heads (`patterns.pooling`) in the tail are replaced by the mode's per-request pooling:
   their output becomes `[slots, hidden]` (or `[slots, 1, hidden]` with keepdims), row i the
   pooling of request slot i's tokens. The exporter's `Expand(norm, shape)` of an L2 normalization
   after it is bypassed (its shape may come from the padded batch; Div broadcasts).
2. The tail is walked in order. Values indexed by request slot on axis 0 ("rows") propagate
   through the ops that keep that meaning (`check_row_op`); a packed per-token input of such an op
   is unpacked if the mode can (unpack_repack, token_stream), and refused otherwise. An op that
   mixes the tokens of a packed row and is not a recognized head is run on unpacked rows if the
   mode can, and refused naming the node otherwise. Shape arithmetic on rows (Shape -> Gather ->
   Concat) is followed, so an Expand or Reshape to a shape read from rows stays correct; an input
   computed from the packed batch (its shape, say) is refused.
3. Outputs: rows are `per_request` (or `unpacked` if they keep the sequence axis), with their
   leading dims set to the rows'; per-token outputs are whatever `token_output` makes of them;
   anything else is `global`.

Request slot order of `per_request` outputs: slot i is the i-th request in the order of their first
tokens in the flattened batch. In unpack_repack and token_stream modes that is unpack_info's order;
in AttentionMask mode it is row-major (row 0's requests by segment id, then row 1's, ...), since the
host numbers a row's requests in the order they lie in it (`runtime/layouts.py`, `Placement.slots`).
"""

from __future__ import annotations

import abc
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError
from poprt_lite.patterns.attention import is_constant
from poprt_lite.patterns.layout import ELEMENTWISE, REDUCE_OPS, TOKENWISE, TokenAxes, classify, constant_ints, is_token_major
from poprt_lite.patterns.pooling import PoolingHead, PoolKind, find_l2_normalizations, find_pooling_heads
from poprt_lite.vocab import Layout

# Ops that act along one axis given by the attribute `axis`, fine on rows unless that is axis 0.
AXIS_ROW_OPS = {"LayerNormalization": -1, "Softmax": -1, "LogSoftmax": -1, "LpNormalization": -1}
# Selections along one axis, fine on rows when their parameters are constants and the axis is not 0.
SELECTIONS = ("Gather", "Slice", "Squeeze", "Unsqueeze", "Split", "Transpose", "CumSum", "ArgMax", "ArgMin")
# Ops that take a shape as input 1: fine on rows when the shape is read from rows.
SHAPED = ("Expand", "Reshape")


class TailPlacement(abc.ABC):
    """How one packing mode places the ops after the encoder (see the module docstring)."""

    mode: str  # the pack mode, for messages
    can_unpack = False  # True if `unpack` brings a packed per-token tensor to one row per request

    def __init__(self, graph: gs.Graph, max_valid_num: int, segment_max_size: int) -> None:
        self.graph = graph
        self.max_valid_num = max_valid_num
        self.segment_max_size = segment_max_size

    @property
    def rows(self) -> tuple[int | str, int | str]:
        """The leading dims of one-row-per-request values: request slots, row length."""
        return self.max_valid_num, self.segment_max_size

    @abc.abstractmethod
    def pool(self, head: PoolingHead) -> gs.Tensor:
        """A new tensor [slots, hidden] pooling `head.hidden` per request slot."""

    def unpack(self, tensor: gs.Tensor) -> gs.Tensor:
        """`tensor` (packed, per token) as one row per request [N, L, ...] (if `can_unpack`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def token_output(self, index: int, output: gs.Tensor) -> Layout:
        """Make graph output `index` (per token, packed) what this mode returns; give its layout."""

    @abc.abstractmethod
    def refusal(self, node: gs.Node, why: str) -> str:
        """The one-line error for a node this mode cannot place."""

    # helpers for subclasses -------------------------------------------------------------------

    def node(self, op: str, inputs: list, name: str, dtype=None, attrs=None, domain: str = "") -> gs.Variable:
        out = gs.Variable(ir.unique_name(self.graph, name), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, inputs=inputs, outputs=[out], attrs=attrs or {}, domain=domain))
        return out

    def const(self, name: str, values) -> gs.Constant:
        return gs.Constant(ir.unique_name(self.graph, name), np.asarray(values))



def place_tail(graph: gs.Graph, tail_ids: set[int], dims: TokenAxes, mask: gs.Tensor | None, placement: TailPlacement) -> dict[str, Layout]:
    """Place everything after the encoder per request (see the module docstring); return every
    graph output's layout. `tail_ids`: ids of the nodes outside the attention cone, taken before
    the attention blocks were rewritten; `mask`: the attention-mask input, if any."""
    tail = [n for n in graph.nodes if id(n) in tail_ids]
    rows: set[int] = set()
    for head in find_pooling_heads(graph, mask, dims, tail):
        _replace_head(graph, head, placement)
        rows.add(id(head.output))
    for norm in find_l2_normalizations(graph, tail):
        if norm.expand is not None:
            divide = norm.output.inputs[0]
            divide.inputs[1] = norm.expand.inputs[0]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    walker = _Walker(graph, dims, placement, rows)
    for node in [n for n in graph.nodes if id(n) in tail_ids]:
        walker.visit(node)
    return walker.layouts()


def pool_rows(placement: TailPlacement, head: PoolingHead, rows: gs.Tensor, lengths: gs.Tensor) -> gs.Tensor:
    """Pool unpacked `rows` [N, L, H] (row i: request i's `lengths[i]` tokens, then zeros) the way
    `head` pools: [N, H] in the hidden dtype, zero for unused slots."""
    name, dtype = head.output.name, np.dtype(head.hidden.dtype)
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    node, const = placement.node, placement.const
    kind = head.kind
    length = node("Cast", [lengths], f"{name}_lengths", np.int64, {"to": onnx.TensorProto.INT64})
    length_col = node("Unsqueeze", [length, const(f"{name}_axis_1", [1])], f"{name}_length_col", np.int64)
    if kind is PoolKind.first:
        return node("Gather", [rows, const(f"{name}_first", np.int64(0))], f"{name}_rows_first", dtype, {"axis": 1})
    if kind is PoolKind.last:  # an unused slot's row is zeros: its index 0 gives zeros
        last = node("Sub", [length_col, const(f"{name}_one_index", np.int64(1))], f"{name}_last_index", np.int64)
        last = node("Max", [last, const(f"{name}_zero_index", np.int64(0))], f"{name}_last_index_used", np.int64)
        return node("GatherND", [rows, last], f"{name}_rows_last", dtype, {"batch_dims": 1})

    def sum_over_tokens(values: gs.Tensor, what: str, keepdims: int = 0) -> gs.Tensor:
        return node("ReduceSum", [values, const(f"{name}_axis_1", [1])], f"{name}_{what}_sum", dtype, {"keepdims": keepdims})

    def at_least_one(value: gs.Tensor, what: str) -> gs.Tensor:
        return node("Max", [value, const(f"{name}_one", np.ones((), dtype))], f"{name}_{what}_divisor", dtype)

    if kind in (PoolKind.mean, PoolKind.mean_sqrt_len):
        count = at_least_one(node("Cast", [length_col], f"{name}_count", dtype, {"to": to}), "count")
        if kind is PoolKind.mean_sqrt_len:
            count = node("Sqrt", [count], f"{name}_count_sqrt", dtype)
        return node("Div", [sum_over_tokens(rows, "token"), count], f"{name}_rows_{kind}", dtype)
    shape = node("Shape", [rows], f"{name}_rows_shape", np.int64)
    longest = node("Gather", [shape, const(f"{name}_1", np.int64(1))], f"{name}_rows_length", np.int64)
    position = node("Range", [const(f"{name}_0", np.int64(0)), longest, const(f"{name}_1", np.int64(1))], f"{name}_positions", np.int64)
    valid = node("Less", [position, length_col], f"{name}_valid", np.bool_)
    if kind is PoolKind.weighted_mean:  # token i (from 1) weighs i: sum(i * h_i) / sum(i)
        from_one = node("Add", [position, const(f"{name}_1", np.int64(1))], f"{name}_positions_from_one", np.int64)
        weights = node("Where", [valid, from_one, const(f"{name}_zero_index", np.int64(0))], f"{name}_weights_used", np.int64)
        weights = node("Cast", [weights], f"{name}_weights", dtype, {"to": to})
        total = at_least_one(sum_over_tokens(weights, "weights", keepdims=1), "weights")
        weights = node("Unsqueeze", [weights, const(f"{name}_axis_2", [2])], f"{name}_token_weights", dtype)
        weighted = node("Mul", [rows, weights], f"{name}_rows_weighted", dtype)
        return node("Div", [sum_over_tokens(weighted, "weighted"), total], f"{name}_rows_weighted_mean", dtype)
    valid = node("Unsqueeze", [valid, const(f"{name}_axis_2", [2])], f"{name}_valid_tokens", np.bool_)
    # past a request's length, its first token: it changes no maximum (and needs no -inf constant)
    first = node("Slice", [rows, const(f"{name}_0", [0]), const(f"{name}_1", [1]), const(f"{name}_axis_1", [1])], f"{name}_rows_first", dtype)
    filled = node("Where", [valid, rows, first], f"{name}_rows_filled", dtype)
    if placement.graph.opset >= 18:
        maxima = node("ReduceMax", [filled, const(f"{name}_axis_1", [1])], f"{name}_rows_max", dtype, {"keepdims": 0})
    else:
        maxima = node("ReduceMax", [filled], f"{name}_rows_max", dtype, {"axes": [1], "keepdims": 0})
    used = node("Greater", [length_col, const(f"{name}_zero_length", np.int64(0))], f"{name}_used", np.bool_)
    return node("Where", [used, maxima, const(f"{name}_zero", np.zeros((), dtype))], f"{name}_rows_max_used", dtype)


def _batch_dependent(graph: gs.Graph) -> set[int]:
    """ids of the tensors that depend on a graph input, i.e. on the packed batch (graph sorted)."""
    found = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        if any(id(t) in found for t in node.inputs):
            found.update(id(t) for t in node.outputs)
    return found


def _replace_head(graph: gs.Graph, head: PoolingHead, placement: TailPlacement) -> None:
    """Make `head.output` the mode's pooling; the head's old nodes are left dead."""
    pooled = placement.pool(head)
    old = head.output.inputs[0]
    old.outputs[old.outputs.index(head.output)] = gs.Variable(ir.unique_name(graph, f"{head.output.name}_replaced"))
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(head.output.dtype or head.hidden.dtype))
    if head.keepdims:
        pooled = placement.node("Unsqueeze", [pooled, placement.const(f"{head.output.name}_axis", [1])], f"{head.output.name}_kept", pooled.dtype)
    graph.nodes.append(gs.Node("Cast", inputs=[pooled], outputs=[head.output], attrs={"to": to}))


class _Walker:
    def __init__(self, graph: gs.Graph, dims: TokenAxes, placement: TailPlacement, rows: set[int]) -> None:
        self.graph = graph
        self.dims = dims
        self.placement = placement
        self.rows = rows  # ids of tensors indexed by request slot on axis 0
        self.shapes: set[int] = set()  # ids of shape values computed from rows
        self.batch_dependent = _batch_dependent(graph)

    def visit(self, node: gs.Node) -> None:
        row_inputs = [t for t in node.inputs if id(t) in self.rows]
        shape_inputs = [t for t in node.inputs if id(t) in self.shapes]
        packed = [t for t in node.inputs if id(t) not in self.rows and is_token_major(t, self.dims)]
        mixing = [t for t in packed if classify(node, t, self.dims) != TOKENWISE]
        if not row_inputs and shape_inputs and not packed:
            self.shapes.update(id(t) for t in node.outputs)  # shape arithmetic on rows' shapes
            return
        if not row_inputs and not mixing:
            return  # stays per token
        if packed and not self.placement.can_unpack:
            why = "combines a per-request value with per-token values" if row_inputs else "mixes the tokens of a packed row"
            raise PoprtError(self.placement.refusal(node, why))
        self.check_row_op(node)
        for tensor in packed:
            rows = self._unpacked(tensor)
            for i, current in enumerate(node.inputs):
                if current is tensor:
                    node.inputs[i] = rows
        for tensor in node.inputs:
            if id(tensor) in self.batch_dependent and id(tensor) not in self.rows and id(tensor) not in self.shapes:
                raise PoprtError(self.placement.refusal(node, f"reads '{tensor.name}', computed from the packed batch"))
        target = self.shapes if node.op == "Shape" else self.rows
        target.update(id(t) for t in node.outputs)

    def _unpacked(self, tensor: gs.Tensor) -> gs.Tensor:
        rows = self.placement.unpack(tensor)
        self.rows.add(id(rows))
        return rows

    def check_row_op(self, node: gs.Node) -> None:
        """Only ops whose meaning survives moving from packed to per-request rows may run there."""
        op = node.op
        fine = op in ELEMENTWISE or op in ("MatMul", "Gemm", "Shape")
        if op in AXIS_ROW_OPS:
            fine = node.attrs.get("axis", AXIS_ROW_OPS[op]) != 0
        if op in SELECTIONS:
            # Selections along an axis: fine when their parameters are constants (CLS = Gather(x, 0, axis=1)).
            fine = all(is_constant(t) for t in node.inputs[1:] if t.name) and node.attrs.get("axis", 1) != 0
        if op == "Transpose":
            fine = list(node.attrs.get("perm", [-1]))[:1] == [0]
        if op == "Concat":  # several heads' rows side by side (a Pooling module with several modes)
            axis = node.attrs.get("axis", 0)
            if axis < 0 and node.inputs[0].shape is not None:
                axis += len(node.inputs[0].shape)
            fine = all(id(t) in self.rows for t in node.inputs) and (len(node.inputs) == 1 or axis > 0)
        if op in REDUCE_OPS:
            axes = node.attrs.get("axes") or (constant_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None)
            fine = axes is not None and 0 not in axes
        if op in SHAPED:
            fine = id(node.inputs[1]) in self.shapes
        if not fine:
            raise PoprtError(self.placement.refusal(node, "does not keep one row per request"))

    def layouts(self) -> dict[str, Layout]:
        found = {}
        for index, output in enumerate(list(self.graph.outputs)):
            name = output.name
            if id(output) in self.rows:
                found[name] = Layout.unpacked if self.dims.keeps_sequence(output) else Layout.per_request
                output.shape = self._per_request_shape(output)
            elif is_token_major(output, self.dims):
                found[name] = self.placement.token_output(index, output)
            else:
                found[name] = Layout.global_
        return found

    def _per_request_shape(self, output: gs.Tensor) -> list | None:
        """The declared packed shape of an output, with its batch axis now the request slots."""
        if output.shape is None:
            return None
        slots, length = self.placement.rows
        rest = list(output.shape[1:])
        if rest and self.dims.keeps_sequence(output):
            rest[0] = length
        return [slots, *rest]
