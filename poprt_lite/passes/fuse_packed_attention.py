"""fuse_packed_attention: one onnxruntime `com.microsoft::MultiHeadAttention` per plain attention block of an attention_mask-packed model.

After attention_mask packing every block computes `Softmax(scale * Q K^T + mask) V` on the heads
layout, with Reshape / Transpose views around it and the block-diagonal `mask` of the
`AttentionMask` op. A *plain* block (nothing on its scores but constant scalar scales and that mask:
`patterns.attention.plain_score_scale`) whose Q, K and V are views of per-token tensors `[B,S,hidden]`
(`token_view_source`) and whose context goes back to `[B,S,hidden]` by views
(`token_view_of_context`) becomes one `MultiHeadAttention(query, key, value, bias, -, attention_bias=mask)`
node (`num_heads`, `scale`: the product of every scale on Q, K and the scores). When Q, K and V
are each `MatMul + constant [hidden]` bias, the three biases go to the node's `bias` input and the
Adds are left to the clean-up. Blocks with other score terms (MPNet's relative-position bias,
DeBERTa's c2p / p2c) stay as they are.

The node is onnxruntime's own (CPU kernel, float32 and float16), so a model this pass has run on
needs onnxruntime: it runs after the attention passes, which refuse fused attention. Opt-in (not
faster on the bench's batches, README "Performance"): `--passes fuse_packed_attention` with
`--pack_args mode=attention_mask`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite import ir, ops
from poprt_lite.errors import PoprtError, option
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.patterns.attention import (
    KEY_HEADS,
    QUERY_HEADS,
    AttentionBlock,
    TokenView,
    constant_array,
    find_attention_blocks,
    plain_probabilities,
    plain_score_scale,
    token_view_of_context,
    token_view_source,
)
from poprt_lite.runtime import modes

MODE = modes.ATTENTION_MASK.name
FUSED_OP = "MultiHeadAttention"


@register_pass("fuse_packed_attention")
class FusePackedAttention(Pass):
    """Fuse each plain attention block of an attention_mask-packed model into onnxruntime's MultiHeadAttention."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        masks = [n.outputs[0] for n in graph.nodes if n.op == "AttentionMask" and n.domain == ops.DOMAIN]
        if len(masks) != 1:
            raise PoprtError(
                f"{self.name} fuses the attention of a model packed in {MODE} mode (one AttentionMask node), "
                f"found {len(masks)} AttentionMask nodes; give {option('pack_args')} mode={MODE}"
            )
        mask = masks[0]
        ir.infer_shapes_in_place(graph)  # the views are recognised by their static shapes
        blocks = find_attention_blocks(graph)
        fused = sum(_fuse(graph, block, mask) for block in blocks)
        return PassResult(changed=fused > 0, message=f"{fused} of {len(blocks)} attention blocks fused into {FUSED_OP}")


def _fuse(graph: gs.Graph, block: AttentionBlock, mask: gs.Tensor) -> bool:
    """Replace `block` by one MultiHeadAttention node if it is plain; whether it was."""
    shape = block.scores.outputs[0].shape
    score_scale = plain_score_scale(block, mask)
    if score_scale is None or not plain_probabilities(block) or shape is None or len(shape) != 4:
        return False
    batch, heads, seq, keys = shape
    if not all(isinstance(d, int) for d in shape) or keys != seq:
        return False
    query = token_view_source(block.query, batch, seq, heads, QUERY_HEADS)
    key = token_view_source(block.key_transposed, batch, seq, heads, KEY_HEADS)
    value = token_view_source(block.value, batch, seq, heads, QUERY_HEADS, scaled=False)
    output = token_view_of_context(block.context.outputs[0], batch, seq, heads)
    if query is None or key is None or value is None or output is None or output in graph.outputs:
        return False
    sources, bias = _projection_biases([query, key, value])
    fused = gs.Variable(ir.unique_name(graph, f"{block.softmax.name or output.name}_fused"), dtype=output.dtype, shape=list(output.shape))
    graph.nodes.append(
        gs.Node(
            FUSED_OP,
            name=ir.unique_name(graph, f"{block.softmax.name or output.name}_{FUSED_OP}"),
            domain=ir.ORT_DOMAIN,
            inputs=[*sources, _bias_constant(graph, bias, fused.name) if bias is not None else gs.Variable.empty(), gs.Variable.empty(), mask],
            outputs=[fused],
            attrs={"num_heads": heads, "scale": float(query.scale * key.scale * score_scale)},
        )
    )
    ir.replace_all_uses(output, fused)
    return True


def _projection_biases(views: list[TokenView]) -> tuple[list[gs.Tensor], np.ndarray | None]:
    """The node's query, key and value inputs, and its `bias` input: when each source is
    `Add(MatMul(x, W), b)` with a constant `[hidden]` b read by nothing else, the MatMul outputs and
    the three b concatenated; otherwise the sources themselves and None."""
    products, biases = [], []
    for view in views:
        add = view.source.inputs[0] if view.source.inputs else None
        if add is None or add.op != "Add" or len(view.source.outputs) != 1:
            return [v.source for v in views], None
        for data, other in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            b = constant_array(other)
            if b is not None and b.shape == (view.source.shape[-1],) and data.inputs and data.inputs[0].op == "MatMul":
                products.append(data)
                biases.append(b)
                break
        else:
            return [v.source for v in views], None
    return products, np.concatenate(biases).astype(biases[0].dtype)


def _bias_constant(graph: gs.Graph, values: np.ndarray, name: str) -> gs.Constant:
    return gs.Constant(ir.unique_name(graph, f"{name}_qkv_bias"), values)
