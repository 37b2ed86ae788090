"""pack_unpack_repack: PopRT's packing, unpacking around attention and repacking after it.

Requests lie one after another in the flattened `[B*S]` token stream; the new input
`unpack_info[N]` (int32) holds their lengths. Everything that acts per token stays on the packed
`[B, S, ...]` layout. Each attention block is recomputed on one row per request (`[N, L, ...]`,
`passes/attention_rows.py`): the last per-token tensors it reads (Q, K, V split into heads, and
whatever its score terms read) are unpacked, its padding mask is built from `unpack_info`, and the
first per-token tensor after its context MatMul is repacked. The exporter's shape arithmetic in
between is recomputed from the rows' shapes, and so are score terms computed from the sequence
length: a relative-position bias (MPNet, T5) or DeBERTa's c2p/p2c see each request's own
positions.

After the encoder, ops that reduce or select along the sequence (mean or CLS pooling) run on
unpacked rows so each request gets its own value; token-level outputs are unpacked to `[N, L, ...]`
(row i is request i). An op the pass cannot place safely is refused, naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir, ops
from poprt_lite.errors import PoprtError
from poprt_lite.passes import pack_tail
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite import vocab
from poprt_lite.runtime import modes
from poprt_lite.vocab import UNPACK_INFO, Layout, Role
from poprt_lite.passes import packing
from poprt_lite.passes.attention_rows import RowRebuilder
from poprt_lite.patterns.attention import AttentionBlock, apply_mask, attention_cone, nan_guards, producer
from poprt_lite.patterns.layout import TokenAxes, token_dims
from poprt_lite.patterns.pooling import PoolingHead

MODE = modes.UNPACK_REPACK.name
UNPACKED_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float16, np.int32, np.int64))  # Unpack's types


@register_pass("pack_unpack_repack")
class PackUnpackRepack(Pass):
    """Packed rows; unpack before and repack after each attention (--pack_args max_valid_num=N segment_max_size=L)."""

    Options = packing.PackOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        setup = packing.prepare(graph, ctx, self.options, self.name)
        if any(t.name == UNPACK_INFO for t in graph.inputs):
            raise PoprtError(f"model already has an '{UNPACK_INFO}' input; it is packed already")
        dims = setup.dims
        cone = attention_cone(graph, setup.blocks)  # once: it walks the whole graph
        tail = [n for n in graph.nodes if id(n) not in cone]
        rewriter = _Rewriter(graph, self.options, setup.input_ids, dims)
        for block in setup.blocks:
            rewriter.rewrite_block(block)
        packing.account_masks(ctx, setup.blocks, rewriter.softmax_on_rows, rewriter.on_rows)
        layouts = rewriter.rewrite_tail(tail, dims)
        vocab.set_role(ctx.metadata, UNPACK_INFO, Role.unpack_info)
        packing.record(ctx, MODE, self.options, layouts)
        return PassResult(changed=True, message=f"{len(setup.blocks)} attention blocks unpacked/repacked")


class _Rewriter(pack_tail.TailPlacement):
    """Unpacks and repacks around attention, places the tail (`pack_tail`, on unpacked rows). Rows
    are static, `[max_valid_num, segment_max_size]`; token_stream_packing's subclass makes them
    follow the batch (`dynamic`)."""

    mode = MODE
    can_unpack = True
    dynamic = False

    def __init__(self, graph: gs.Graph, options: packing.PackOptions, input_ids: gs.Variable, dims: TokenAxes | None = None) -> None:
        super().__init__(graph, options.max_valid_num, options.segment_max_size)
        self.options = options
        dims = dims or token_dims(graph, options.input_name)
        self.rebuilder = RowRebuilder(graph, dims.token_major, self.unpack, self.row_shape)
        self._dynamic_row_dims: gs.Variable | None = None
        self.unpack_info = gs.Variable(UNPACK_INFO, dtype=np.int32, shape=[self.rows[0]])
        graph.inputs.append(self.unpack_info)
        self.packed_shape = self._node("Shape", [input_ids], "packed_shape", np.int64)
        self.padding_masks: dict[int, gs.Variable] = {}
        self.unpacked: dict[str, gs.Tensor] = {}  # packed tensor name -> its unpacked twin

    def _node(self, op: str, inputs: list, name: str, dtype=None, attrs=None, domain: str = "") -> gs.Variable:
        return self.node(op, inputs, name, dtype, attrs, domain)

    def _unique(self, name: str) -> str:
        return ir.unique_name(self.graph, name)

    @property
    def rows(self) -> tuple[int | str, int | str]:
        """The leading dims of unpacked rows: request slots, row length."""
        return self.options.max_valid_num, self.options.segment_max_size

    @property
    def row_attrs(self) -> dict[str, int]:
        """The attributes of Unpack (and, but max_valid_num, PaddingMask) that fix the rows."""
        attrs = {"max_valid_num": self.options.max_valid_num, "segment_max_size": self.options.segment_max_size}
        return {**attrs, "dynamic": 1} if self.dynamic else attrs

    def _unpack_node(self, tensor: gs.Tensor, name: str) -> gs.Variable:
        return self._node("Unpack", [tensor, self.unpack_info], name, tensor.dtype, self.row_attrs, ops.DOMAIN)

    def repack(self, tensor: gs.Tensor, name: str) -> gs.Variable:
        return self._node("Repack", [tensor, self.unpack_info, self.packed_shape], name, tensor.dtype, domain=ops.DOMAIN)

    def padding_mask(self, dtype: int) -> gs.Variable:
        if dtype not in self.padding_masks:
            self.padding_masks[dtype] = self._node(
                "PaddingMask",
                [self.unpack_info],
                "unpacked_padding_mask",
                onnx.helper.tensor_dtype_to_np_dtype(dtype),
                {**{k: v for k, v in self.row_attrs.items() if k != "max_valid_num"}, "dtype": dtype},
                ops.DOMAIN,
            )
        return self.padding_masks[dtype]

    def rewrite_block(self, block: AttentionBlock) -> None:
        """Recompute the block, its score terms included, on one row per request; repack after it."""
        scores_dtype = onnx.TensorProto.FLOAT16 if block.scores.outputs[0].dtype == np.float16 else onnx.TensorProto.FLOAT
        if not block.biases and not block.combined:
            # Nothing but packing's mask will mask the scores: it is finite and every row has a real
            # key, so no Softmax row is all -inf and sdpa's NaN guard (a pass over every score) is idle.
            for guard in nan_guards(block):
                ir.replace_all_uses(guard.outputs[0], guard.inputs[2])
        apply_mask(self.graph, block, self.padding_mask(scores_dtype))
        end = self.rebuilder.end_of(block)
        packed = self.repack(self.rebuilder.rows_of(end), f"{end.name}_repacked")
        ir.replace_all_uses(end, packed)

    def on_rows(self, tensor: gs.Tensor) -> gs.Tensor:
        """What a rewritten block reads in place of `tensor`: its twin on rows, if it was recomputed."""
        return self.rebuilder.twins.get(id(tensor), tensor)

    def softmax_on_rows(self, block: AttentionBlock) -> gs.Node:
        """The Softmax that computes `block` on rows once it is rewritten."""
        return producer(self.on_rows(block.softmax.outputs[0]))

    def row_dims(self) -> gs.Tensor:
        """`rows` as an int64 [2] tensor: constant when static; when the rows follow the batch, one
        per `unpack_info` entry, as long as the longest request (as Unpack(dynamic=1) makes them)."""
        if all(isinstance(d, int) for d in self.rows):
            return gs.Constant(self._unique("row_dims"), np.asarray(self.rows, np.int64))
        if self._dynamic_row_dims is None:
            lengths = self._node("Cast", [self.unpack_info], "row_lengths", np.int64, {"to": onnx.TensorProto.INT64})
            flat = self._node("Reshape", [lengths, gs.Constant(self._unique("flat"), np.asarray([-1], np.int64))], "row_lengths_flat", np.int64)
            slots = self._node("Shape", [flat], "row_slots", np.int64)
            longest = self._node("ReduceMax", [flat], "row_longest", np.int64, {"keepdims": 1})
            self._dynamic_row_dims = self._node("Concat", [slots, longest], "row_dims", np.int64, {"axis": 0})
        return self._dynamic_row_dims

    def row_shape(self, tensor: gs.Tensor) -> gs.Variable:
        """The shape of `tensor` ([batch, seq, ...] packed) on rows: [*row_dims, ...]."""
        rows = self.row_dims()
        two = gs.Constant(self._unique("two"), np.asarray([2], np.int64))
        end = gs.Constant(self._unique("last"), np.asarray([2**62], np.int64))
        trailing = self._node("Slice", [self._node("Shape", [tensor], f"{tensor.name}_shape", np.int64), two, end], f"{tensor.name}_trailing", np.int64)
        return self._node("Concat", [rows, trailing], f"{tensor.name}_row_shape", np.int64, {"axis": 0})

    def rewrite_tail(self, tail: list[gs.Node], dims: TokenAxes) -> dict[str, Layout]:
        """Place the ops after the encoder (`tail`, listed before the blocks were rewritten) on
        unpacked rows (`pack_tail.place_tail`); give every output's layout."""
        mask = next((t for t in self.graph.inputs if t.name == self.options.attention_mask_name), None)
        return pack_tail.place_tail(self.graph, {id(n) for n in tail}, dims, mask, self)

    # ------------------------------------------------------------------ TailPlacement (pack_tail)

    def pool(self, head: PoolingHead) -> gs.Tensor:
        return pack_tail.pool_rows(self, head, self.unpack(head.hidden), self.unpack_info)

    def unpack(self, tensor: gs.Tensor) -> gs.Tensor:
        if tensor.name not in self.unpacked:
            dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
            if dtype is None or dtype in UNPACKED_DTYPES:
                self.unpacked[tensor.name] = self._unpack_node(tensor, f"{tensor.name}_unpacked")
            else:  # a boolean or narrow mask a kept mask term reads: unpacked as int32, cast back
                wide = self._node("Cast", [tensor], f"{tensor.name}_int32", np.int32, {"to": onnx.TensorProto.INT32})
                rows = self._unpack_node(wide, f"{tensor.name}_unpacked_int32")
                to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
                self.unpacked[tensor.name] = self._node("Cast", [rows], f"{tensor.name}_unpacked", dtype, {"to": to})
        return self.unpacked[tensor.name]

    def refusal(self, node: gs.Node, why: str) -> str:
        return f"{self.mode} cannot place node '{node.name}' ({node.op}) after the encoder on per-request rows: it {why}; remove it from the model"

    def token_output(self, index: int, output: gs.Variable) -> Layout:
        """Make graph output `index` (per token, packed) what this mode returns; give its layout."""
        self.graph.outputs[index] = self._unpack_output(output)
        return Layout.unpacked

    def _unpack_output(self, output: gs.Variable) -> gs.Variable:
        name = output.name
        output.name = self._unique(f"{name}_packed")
        out = gs.Variable(name, dtype=output.dtype, shape=[*self.rows, *output.shape[2:]])
        self.graph.nodes.append(
            gs.Node("Unpack", domain=ops.DOMAIN, inputs=[output, self.unpack_info], outputs=[out], attrs=self.row_attrs)
        )
        return out
