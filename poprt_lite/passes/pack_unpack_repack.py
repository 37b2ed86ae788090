"""pack_unpack_repack: PopRT's packing, unpacking around attention and repacking after it.

Requests lie one after another in the flattened `[B*S]` token stream; the new input
`unpack_info[N]` (int32) holds their lengths. Everything that acts per token stays on the packed
`[B, S, ...]` layout. Each attention block unpacks Q, K and V to one row per request
(`[N, heads, L, head_dim]`), attends under a padding mask built from `unpack_info`, and repacks
the context. The boundaries sit at the attention MatMuls, so the exporter's reshapes (computed
from packed shapes) stay valid; the Transposes around Unpack/Repack cancel against the model's own
head transposes in onnxruntime's optimizer.

After the encoder, ops that reduce or select along the sequence (mean or CLS pooling) run on
unpacked rows so each request gets its own value; token-level outputs are unpacked to `[N, L, ...]`
(row i is request i). An op the pass cannot place safely is refused, naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ops
from poprt_lite.errors import PoprtError
from poprt_lite.passes import pack_tail
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite import vocab
from poprt_lite.vocab import UNPACK_INFO, Layout, PackMode, Role
from poprt_lite.passes import packing
from poprt_lite.patterns.attention import AttentionBlock, apply_mask, attention_cone
from poprt_lite.patterns.layout import TokenAxes, token_dims
from poprt_lite.patterns.pooling import PoolingHead

MODE = PackMode.unpack_repack
HEADS_TO_TOKENS = [0, 2, 1, 3]  # [B, h, S, d] <-> [B, S, h, d]
KT_TO_TOKENS = [0, 3, 1, 2]  # [B, h, d, S] -> [B, S, h, d]
TOKENS_TO_KT = [0, 2, 3, 1]  # [N, L, h, d] -> [N, h, d, L]


@register_pass("pack_unpack_repack")
class PackUnpackRepack(Pass):
    """Packed rows; unpack before and repack after each attention (--pack_args max_valid_num=N segment_max_size=L)."""

    Options = packing.PackOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        setup = packing.prepare(graph, ctx, self.options, self.name)
        if any(t.name == UNPACK_INFO for t in graph.inputs):
            raise PoprtError(f"model already has an '{UNPACK_INFO}' input; it is packed already")
        dims = token_dims(graph, self.options.input_name)
        cone = attention_cone(graph, setup.blocks)  # once: it walks the whole graph
        tail = [n for n in graph.nodes if id(n) not in cone]
        rewriter = _Rewriter(graph, self.options, setup.input_ids)
        for block in setup.blocks:
            rewriter.rewrite_block(block)
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

    def __init__(self, graph: gs.Graph, options: packing.PackOptions, input_ids: gs.Variable) -> None:
        super().__init__(graph, options.max_valid_num, options.segment_max_size)
        self.options = options
        self.unpack_info = gs.Variable(UNPACK_INFO, dtype=np.int32, shape=[self.rows[0]])
        graph.inputs.append(self.unpack_info)
        self.packed_shape = self._node("Shape", [input_ids], "packed_shape", np.int64)
        self.padding_masks: dict[int, gs.Variable] = {}
        self.unpacked: dict[str, gs.Tensor] = {}  # packed tensor name -> its unpacked twin

    def _node(self, op: str, inputs: list, name: str, dtype=None, attrs=None, domain: str = "") -> gs.Variable:
        return self.node(op, inputs, name, dtype, attrs, domain)

    def _unique(self, name: str) -> str:
        return pack_tail.unique_name(self.graph, name)

    def _transpose(self, tensor: gs.Tensor, perm: list[int], name: str) -> gs.Variable:
        return self._node("Transpose", [tensor], name, tensor.dtype, {"perm": perm})

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
        def unpacked_heads(tensor: gs.Tensor, to_tokens: list[int], from_tokens: list[int], tag: str) -> gs.Variable:
            tokens = self._transpose(tensor, to_tokens, f"{tensor.name}_{tag}_tokens")
            return self._transpose(self._unpack_node(tokens, f"{tensor.name}_{tag}_unpacked"), from_tokens, f"{tensor.name}_{tag}_rows")

        block.scores.inputs[0] = unpacked_heads(block.query, HEADS_TO_TOKENS, HEADS_TO_TOKENS, "q")
        block.scores.inputs[1] = unpacked_heads(block.key_transposed, KT_TO_TOKENS, TOKENS_TO_KT, "kt")
        block.context.inputs[1] = unpacked_heads(block.value, HEADS_TO_TOKENS, HEADS_TO_TOKENS, "v")
        context = block.context.outputs[0]
        rows = gs.Variable(self._unique(f"{context.name}_rows"), dtype=context.dtype)
        block.context.outputs[0] = rows
        tokens = self.repack(self._transpose(rows, HEADS_TO_TOKENS, f"{context.name}_row_tokens"), f"{context.name}_repacked")
        self.graph.nodes.append(gs.Node("Transpose", inputs=[tokens], outputs=[context], attrs={"perm": HEADS_TO_TOKENS}))
        scores_dtype = onnx.TensorProto.FLOAT16 if block.scores.outputs[0].dtype == np.float16 else onnx.TensorProto.FLOAT
        apply_mask(self.graph, block, self.padding_mask(scores_dtype))

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
            self.unpacked[tensor.name] = self._unpack_node(tensor, f"{tensor.name}_unpacked")
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
