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
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite import vocab
from poprt_lite.vocab import UNPACK_INFO, Layout, PackMode, Role
from poprt_lite.passes import packing
from poprt_lite.patterns.attention import AttentionBlock, apply_mask, attention_cone, is_constant
from poprt_lite.patterns.layout import ELEMENTWISE, REDUCE_OPS, TOKENWISE, TokenAxes, classify, constant_ints, is_token_major, token_dims

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
        tail = [n for n in graph.nodes if id(n) not in attention_cone(graph, setup.blocks)]
        rewriter = _Rewriter(graph, self.options, setup.input_ids)
        for block in setup.blocks:
            rewriter.rewrite_block(block)
        layouts = rewriter.rewrite_tail(tail, dims)
        vocab.set_role(ctx.metadata, UNPACK_INFO, Role.unpack_info)
        packing.record(ctx, MODE, self.options, layouts)
        return PassResult(changed=True, message=f"{len(setup.blocks)} attention blocks unpacked/repacked")


class _Rewriter:
    """Unpacks and repacks around attention, places the tail. Rows are static, `[max_valid_num,
    segment_max_size]`; token_stream_packing's subclass makes them follow the batch (`dynamic`)."""

    dynamic = False

    def __init__(self, graph: gs.Graph, options: packing.PackOptions, input_ids: gs.Variable) -> None:
        self.graph = graph
        self.options = options
        self.unpack_info = gs.Variable(UNPACK_INFO, dtype=np.int32, shape=[self.rows[0]])
        graph.inputs.append(self.unpack_info)
        self.packed_shape = self._node("Shape", [input_ids], "packed_shape", np.int64)
        self.padding_masks: dict[int, gs.Variable] = {}
        self.unpacked: dict[str, gs.Tensor] = {}  # packed tensor name -> its unpacked twin

    def _node(self, op: str, inputs: list, name: str, dtype=None, attrs=None, domain: str = "") -> gs.Variable:
        out = gs.Variable(self._unique(name), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, inputs=inputs, outputs=[out], attrs=attrs or {}, domain=domain))
        return out

    def _unique(self, name: str) -> str:
        tensors = self.graph.tensors()
        candidate, i = name, 0
        while candidate in tensors:
            i += 1
            candidate = f"{name}_{i}"
        return candidate

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

    def unpack(self, tensor: gs.Tensor, name: str) -> gs.Variable:
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
            return self._transpose(self.unpack(tokens, f"{tensor.name}_{tag}_unpacked"), from_tokens, f"{tensor.name}_{tag}_rows")

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
        """Move sequence-level ops after the encoder onto unpacked rows; unpack token outputs.

        A tensor is "per request" once it comes from unpacked rows: its axis 0 indexes requests.
        """
        per_request: set[str] = set()
        for node in tail:
            packed_inputs = [t for t in node.inputs if is_token_major(t, dims) and t.name not in per_request]
            row_inputs = [t for t in node.inputs if t.name in per_request]
            mixing = [t for t in packed_inputs if classify(node, t, dims) != TOKENWISE]
            if not row_inputs and not mixing:
                continue
            self._check_row_op(node, dims)
            for tensor in packed_inputs:
                for i, current in enumerate(node.inputs):
                    if current is tensor:
                        node.inputs[i] = self._unpacked(tensor)
            per_request.update(t.name for t in node.outputs)
        layouts = {}
        for index, output in enumerate(list(self.graph.outputs)):
            name = output.name
            if name in per_request:
                layouts[name] = Layout.unpacked if dims.keeps_sequence(output) else Layout.per_request
                output.shape = self._per_request_shape(output, dims)
            elif is_token_major(output, dims):
                layouts[name] = self.token_output(index, output)
            else:
                layouts[output.name] = Layout.global_
        return layouts

    def _check_row_op(self, node: gs.Node, dims: TokenAxes) -> None:
        """Only ops whose meaning survives moving from packed to per-request rows may run there."""
        fine = node.op in ELEMENTWISE or node.op in REDUCE_OPS or node.op in ("MatMul", "Gemm", "LayerNormalization", "Softmax")
        if node.op in ("Gather", "Slice", "Squeeze", "Unsqueeze", "Split", "Concat", "Transpose", "CumSum", "ArgMax", "ArgMin"):
            # Selections along an axis: fine when their parameters are constants (CLS = Gather(x, 0, axis=1)).
            fine = all(is_constant(t) for t in node.inputs[1:]) and node.attrs.get("axis", 1) != 0
        if node.op in REDUCE_OPS:
            axes = node.attrs.get("axes") or (constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None)
            fine = axes is not None and 0 not in axes
        if not fine:
            raise PoprtError(
                f"pack_unpack_repack cannot place node '{node.name}' ({node.op}) after the encoder on per-request rows; use mode=attention_mask or remove it from the model"
            )

    def _per_request_shape(self, output: gs.Tensor, dims: TokenAxes) -> list | None:
        """The declared packed shape of an output, with its batch axis now the request slots (and
        its sequence axis, if it keeps one, the rows' length)."""
        if output.shape is None:
            return None
        slots, length = self.rows
        rest = list(output.shape[1:])
        if rest and dims.keeps_sequence(output):
            rest[0] = length
        return [slots, *rest]

    def token_output(self, index: int, output: gs.Variable) -> Layout:
        """Make graph output `index` (per token, packed) what this mode returns; give its layout."""
        self.graph.outputs[index] = self._unpack_output(output)
        return Layout.unpacked

    def _unpacked(self, tensor: gs.Tensor) -> gs.Tensor:
        if tensor.name not in self.unpacked:
            self.unpacked[tensor.name] = self.unpack(tensor, f"{tensor.name}_unpacked")
        return self.unpacked[tensor.name]

    def _unpack_output(self, output: gs.Variable) -> gs.Variable:
        name = output.name
        output.name = self._unique(f"{name}_packed")
        out = gs.Variable(name, dtype=output.dtype, shape=[*self.rows, *output.shape[2:]])
        self.graph.nodes.append(
            gs.Node("Unpack", domain=ops.DOMAIN, inputs=[output, self.unpack_info], outputs=[out], attrs=self.row_attrs)
        )
        return out
