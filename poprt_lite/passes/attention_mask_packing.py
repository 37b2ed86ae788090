"""attention_mask_packing: keep the packed layout everywhere, mask attention block-diagonally.

The host fills `attention_mask` with a segment id per token (1, 2, 3, ... for the requests of a
row, 0 for padding); `AttentionMask(attention_mask)` turns it into the additive `[B,1,S,S]` mask
that replaces whatever padding mask the exporter built, in every attention block. Outputs stay
packed: the host splits them by segment.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ops
from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.vocab import Layout, PackMode
from poprt_lite.passes import packing
from poprt_lite.patterns.attention import apply_mask, attention_cone
from poprt_lite.patterns.layout import MIXING, TOKENWISE, TokenAxes, classify, is_token_major, token_dims

MODE = PackMode.attention_mask


@register_pass("attention_mask_packing")
class AttentionMaskPacking(Pass):
    """Packed rows with a block-diagonal AttentionMask from segment ids (--pack_args mode=attention_mask)."""

    Options = packing.PackOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        setup = packing.prepare(graph, ctx, self.options, self.name)
        if setup.attention_mask is None:
            raise PoprtError(f"{self.name} needs an '{self.options.attention_mask_name}' input to carry the segment ids")
        dims = token_dims(graph, self.options.input_name)
        _refuse_token_mixing_tail(graph, setup, dims)
        mask_dtype = _mask_dtype(setup.blocks[0].scores.outputs[0])
        segment_mask = gs.Variable("segment_attention_mask", dtype=onnx.helper.tensor_dtype_to_np_dtype(mask_dtype))
        graph.nodes.append(
            gs.Node(
                "AttentionMask",
                domain=ops.DOMAIN,
                inputs=[setup.attention_mask],
                outputs=[segment_mask],
                attrs={"dtype": mask_dtype},
            )
        )
        for block in setup.blocks:
            apply_mask(graph, block, segment_mask)
        layouts = {t.name: Layout.packed for t in graph.outputs}
        packing.record(ctx, MODE, self.options, layouts)
        return PassResult(changed=True, message=f"{len(setup.blocks)} attention blocks masked by segment")


def _mask_dtype(scores: gs.Tensor) -> int:
    return onnx.TensorProto.FLOAT16 if scores.dtype == np.float16 else onnx.TensorProto.FLOAT


def _refuse_token_mixing_tail(graph: gs.Graph, setup: packing.PackSetup, dims: TokenAxes) -> None:
    """Outside the encoder, an op that mixes the tokens of a row (pooling) would mix requests."""
    cone = attention_cone(graph, setup.blocks)
    for node in graph.nodes:
        if id(node) in cone:
            continue
        for tensor in node.inputs:
            if not is_token_major(tensor, dims):
                continue
            kind = classify(node, tensor, dims)
            if kind != TOKENWISE:
                why = "mixes the tokens of a packed row" if kind == MIXING else "is not known to act per token"
                raise PoprtError(
                    f"{MODE} packing cannot keep node '{node.name}' ({node.op}) per request: it {why}; use --pack_args mode=unpack_repack"
                )
