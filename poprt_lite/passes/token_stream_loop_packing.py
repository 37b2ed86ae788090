"""token_stream_loop_packing: a token stream whose attention runs at each request's own length.

token_stream (passes/token_stream_packing.py) attends on `[N, heads, L, L]` rows, L the batch's
longest request. On a CPU that is what makes a batch of long requests slower than the same
requests run one by one: the padded pairs cost as much as real ones, and a batch's score tensors
(about 100 MB per layer for 36 BERT-base requests of up to 256 tokens) leave the caches, where
each request's own `[1, heads, len, len]` stays in them. This pass packs as token_stream does, then
moves each attention block's per-request rows into an ONNX `Loop` over the batch's requests:
iteration i takes request i's tokens from the stream (`[1, len_i, ...]`, what Unpack gives a batch
of that one request), recomputes the block on them (its score terms, position biases and mask
from its own length) and appends its context to a sequence; the concatenated sequence is the
repacked stream. Dense layers still run once on the whole stream. Host layout, feeds and outputs
are token_stream's (mode token_stream_loop, runtime/modes.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from poprt_lite import ir, ops
from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.passes.token_stream_packing import TokenStreamPacking
from poprt_lite.runtime import modes
from poprt_lite.vocab import UNPACK_INFO

MODE = modes.TOKEN_STREAM_LOOP.name
MIN_OPSET = 11  # SequenceEmpty, SequenceInsert, ConcatFromSequence


@register_pass("token_stream_loop_packing")
class TokenStreamLoopPacking(TokenStreamPacking):
    """One dynamic [1, T] token stream per batch; attention in a Loop over its requests (--pack_args mode=token_stream_loop)."""

    mode = MODE

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if graph.opset < MIN_OPSET:
            raise PoprtError(f"{self.name} needs opset >= {MIN_OPSET} (a Loop over sequences); the model has opset {graph.opset}: export it at a newer opset")
        super().run(graph, ctx)
        graph.toposort()
        ir.infer_shapes_in_place(graph)  # a body declares the types of the outer tensors it reads
        looper = _Looper(graph, next(t for t in graph.inputs if t.name == UNPACK_INFO))
        repacks = [n for n in graph.nodes if n.domain == ops.DOMAIN and n.op == "Repack"]
        for node in repacks:
            looper.loop(node)
        return PassResult(changed=True, message=f"{len(repacks)} attention blocks in Loops over the requests")


class _Looper:
    """Replaces `Repack(rows)` by a Loop computing the rows one request at a time.

    The body is held as an onnx GraphProto, which onnx-graphsurgeon leaves alone (its copies and
    folds of subgraphs that read outer tensors recurse forever). So that it sees what the body
    reads, every outer tensor the body reads goes in as a loop-carried value passed through
    unchanged (the body's output is its input); constants are copied into the body.
    """

    def __init__(self, graph: gs.Graph, unpack_info: gs.Variable) -> None:
        self.graph, self.unpack_info = graph, unpack_info
        self.fresh = ir.FreshNames(graph)
        self.order = {id(n): k for k, n in enumerate(graph.nodes)}  # topologically sorted
        self.rows: set[int] = set()  # ids of the row-level nodes (before this adds any)
        for node in graph.nodes:
            if self._row_level(node):
                self.rows.add(id(node))
        self.lengths = self._node(graph.nodes, "Cast", [unpack_info], "loop_lengths", np.int64, {"to": onnx.TensorProto.INT64})
        self.ends = self._node(graph.nodes, "CumSum", [self.lengths, gs.Constant(self.fresh("loop_axis"), np.asarray(0, np.int64))], "loop_ends", np.int64)
        self.starts = self._node(graph.nodes, "Sub", [self.ends, self.lengths], "loop_starts", np.int64)
        count = self._node(graph.nodes, "Shape", [self.lengths], "loop_count_1d", np.int64)
        self.count = self._node(graph.nodes, "Reshape", [count, gs.Constant(self.fresh("scalar"), np.zeros(0, np.int64))], "loop_count", np.int64)

    def _node(self, nodes: list, op: str, inputs: list, name: str, dtype, attrs=None) -> gs.Variable:
        return _append(nodes, self.fresh, op, inputs, name, dtype, attrs)

    def _row_level(self, node: gs.Node) -> bool:
        """Computed from the batch's rows: reads unpack_info or a row tensor (Repack makes a stream)."""
        return node.op != "Repack" and any(t is self.unpack_info or (t.inputs and id(t.inputs[0]) in self.rows) for t in node.inputs)

    def loop(self, repack: gs.Node) -> None:
        rows_out = repack.inputs[0]
        body = _Body(self)
        i1 = body.node("Reshape", [body.index, body.const("one_dim", [1])], "loop_i_1d", np.int64)
        i2 = body.node("Add", [i1, body.const("one", [1])], "loop_i_next", np.int64)
        start = body.node("Slice", [body.read(self.starts), i1, i2], "loop_start", np.int64)
        end = body.node("Slice", [body.read(self.ends), i1, i2], "loop_end", np.int64)
        length = body.node("Slice", [body.read(self.lengths), i1, i2], "loop_length", np.int64)
        twins: dict[int, gs.Tensor] = {id(self.unpack_info): body.node("Slice", [body.read(self.unpack_info), i1, i2], "loop_unpack_info", self.unpack_info.dtype)}
        for node in self._region(rows_out):
            out = node.outputs[0]
            if node.domain == ops.DOMAIN and node.op == "Unpack":  # request i's tokens of the stream
                twins[id(out)] = body.node("Slice", [body.read(node.inputs[0]), start, end, body.const("token_axis", [1])], f"{out.name}_request", out.dtype)
            elif node.domain == ops.DOMAIN and node.op == "PaddingMask":  # row i of the mask, its own length
                lo = body.node("Concat", [i1, body.const("zero", [0])], "loop_mask_starts", np.int64, {"axis": 0})
                hi = body.node("Concat", [i2, length], "loop_mask_ends", np.int64, {"axis": 0})
                twins[id(out)] = body.node("Slice", [body.read(out), lo, hi, body.const("mask_axes", [0, 3])], f"{out.name}_request", out.dtype)
            else:
                if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                    raise PoprtError(f"node '{node.name}' ({node.op}) has a subgraph; its attention cannot run in a Loop over the requests")
                inputs = [twins[id(t)] if id(t) in twins else body.read(t) if t.name else t for t in node.inputs]
                outputs = [gs.Variable(self.fresh(f"{o.name}_request"), dtype=o.dtype) for o in node.outputs]
                body.nodes.append(gs.Node(node.op, node.name and f"{node.name}_request", dict(node.attrs), inputs, outputs, domain=node.domain))
                twins.update((id(o), t) for o, t in zip(node.outputs, outputs))
        if id(rows_out) not in twins:
            raise PoprtError(f"Repack '{repack.name}' reads rows not computed from unpack_info; cannot loop its attention over the requests")
        contexts = gs.Variable(self.fresh("loop_contexts"), dtype=rows_out.dtype, type="sequence_type")
        empty = gs.Variable(self.fresh("loop_contexts_empty"), dtype=rows_out.dtype, type="sequence_type")
        self.graph.nodes.append(gs.Node("SequenceEmpty", inputs=[], outputs=[empty], attrs={"dtype": _elem_type(rows_out)}))
        passed = [gs.Variable(self.fresh(f"{t.name}_passed"), dtype=t.dtype) for t in body.outer]
        self.graph.nodes.append(gs.Node(
            "Loop", self.fresh(f"{rows_out.name}_loop"), {"body": body.proto(twins[id(rows_out)], self.fresh(f"{rows_out.name}_loop_body"))},
            [self.count, gs.Variable.empty(), *body.outer, empty], [*passed, contexts],
        ))
        stream = self._node(self.graph.nodes, "ConcatFromSequence", [contexts], f"{repack.outputs[0].name}_looped", rows_out.dtype, {"axis": 1})
        ir.replace_all_uses(repack.outputs[0], stream)

    def _region(self, tensor: gs.Tensor) -> list[gs.Node]:
        """The row-level nodes `tensor` is computed from, in graph order."""
        found, stack = {}, [tensor]
        while stack:
            t = stack.pop()
            node = t.inputs[0] if t.inputs else None
            if node is None or id(node) not in self.rows or id(node) in found:
                continue
            found[id(node)] = node
            if not (node.domain == ops.DOMAIN and node.op in ("Unpack", "PaddingMask")):
                stack.extend(node.inputs)
        return sorted(found.values(), key=lambda n: self.order[id(n)])


class _Body:
    """One Loop body being built: its nodes, and the outer tensors it reads (carried through)."""

    def __init__(self, looper: _Looper) -> None:
        self.fresh = looper.fresh
        self.nodes: list[gs.Node] = []
        self.index = gs.Variable(self.fresh("loop_i"), dtype=np.int64, shape=[])
        self.cond = gs.Variable(self.fresh("loop_cond"), dtype=np.bool_, shape=[])
        self.outer: list[gs.Tensor] = []
        self._aliases: dict[int, gs.Tensor] = {}

    def node(self, op: str, inputs: list, name: str, dtype, attrs=None) -> gs.Variable:
        return _append(self.nodes, self.fresh, op, inputs, name, dtype, attrs)

    def const(self, name: str, values) -> gs.Variable:
        return self.read(gs.Constant(self.fresh(name), np.asarray(values, np.int64)))

    def read(self, tensor: gs.Tensor) -> gs.Tensor:
        """The body's name for outer `tensor`: a Constant node's output, or a carried input."""
        if id(tensor) not in self._aliases:
            if isinstance(tensor, gs.Constant):
                alias = self.node("Constant", [], f"{tensor.name}_copy", tensor.dtype, {"value": tensor})
            else:
                if tensor.dtype is None:
                    raise PoprtError(f"tensor '{tensor.name}' has no known type; its attention cannot run in a Loop over the requests")
                alias = gs.Variable(self.fresh(f"{tensor.name}_carried"), dtype=tensor.dtype)
                self.outer.append(tensor)
            self._aliases[id(tensor)] = alias
        return self._aliases[id(tensor)]

    def proto(self, rows: gs.Tensor, name: str) -> onnx.GraphProto:
        seq_in = onnx.helper.make_tensor_sequence_value_info(self.fresh("loop_contexts_in"), _elem_type(rows), None)
        seq_out = self.fresh("loop_contexts_out")
        cond_out = self.node("Identity", [self.cond], "loop_cond_out", np.bool_)
        nodes = [OnnxExporter.export_node(n) for n in self.nodes]
        nodes.append(onnx.helper.make_node("SequenceInsert", [seq_in.name, rows.name], [seq_out]))
        carried = [onnx.helper.make_tensor_value_info(self._aliases[id(t)].name, _elem_type(t), None) for t in self.outer]
        return onnx.helper.make_graph(
            nodes, name,
            [onnx.helper.make_tensor_value_info(self.index.name, onnx.TensorProto.INT64, []),
             onnx.helper.make_tensor_value_info(self.cond.name, onnx.TensorProto.BOOL, []), *carried, seq_in],
            [onnx.helper.make_tensor_value_info(cond_out.name, onnx.TensorProto.BOOL, []), *carried,
             onnx.helper.make_tensor_sequence_value_info(seq_out, _elem_type(rows), None)],
        )


def _append(nodes: list, fresh: ir.FreshNames, op: str, inputs: list, name: str, dtype, attrs=None) -> gs.Variable:
    """Append a one-output node to `nodes`; return its output."""
    out = gs.Variable(fresh(name), dtype=dtype)
    nodes.append(gs.Node(op, inputs=inputs, outputs=[out], attrs=attrs or {}))
    return out


def _elem_type(tensor: gs.Tensor) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
