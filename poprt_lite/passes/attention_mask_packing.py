"""attention_mask_packing: keep the packed layout everywhere, mask attention block-diagonally.

The host fills `attention_mask` with a segment id per token (1, 2, 3, ... for the requests of a
row, 0 for padding); `AttentionMask(attention_mask)` turns it into the additive `[B,1,S,S]` mask
that replaces whatever padding mask the exporter built, in every attention block. Per-token outputs
stay packed: the host splits them by segment. Pooling heads after the encoder become
`SegmentPool(hidden, attention_mask)`: one row per request, `[max_valid_num, ...]` in row-major
request order (`pack_tail`). The model's other readers of the mask (DeBERTa multiplies its
embeddings by it; an output echoing it) get its 0/1 view `Min(attention_mask, 1)`, the padding mask
the model was written for.

Only the terms proven to be the padding mask alone are replaced (`patterns/mask_terms.py`). Every
other score term stays as it is, computed on the packed row (reading the 0/1 mask where it reads
the mask): a relative-position bias, DeBERTa's c2p/p2c, a sliding-window band or a causal mask
combined with the padding mask. For two tokens of one request the row gives them the same relative
position as the request alone, and the segment mask hides the other pairs. A term that is not the
same for a request anywhere in a row as for the request alone (it uses absolute positions, or a
table indexed by them) is refused, naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ops
from poprt_lite.errors import PoprtError, option
from poprt_lite.ops.segment_pool import FIRST, LAST, MAX, MEAN, MEAN_SQRT_LEN, WEIGHTED_MEAN
from poprt_lite.passes import pack_tail
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.passes import packing
from poprt_lite.patterns import mask_terms
from poprt_lite.patterns.attention import apply_mask, attention_cone, relative_position_sources
from poprt_lite.patterns.layout import token_dims
from poprt_lite.patterns.pooling import PoolingHead, PoolKind
from poprt_lite.runtime import modes
from poprt_lite.vocab import Layout

MODE = modes.ATTENTION_MASK.name
SEGMENT_POOL_MODES = {
    PoolKind.mean: MEAN, PoolKind.max: MAX, PoolKind.first: FIRST,
    PoolKind.mean_sqrt_len: MEAN_SQRT_LEN, PoolKind.weighted_mean: WEIGHTED_MEAN, PoolKind.last: LAST,
}


@register_pass("attention_mask_packing")
class AttentionMaskPacking(Pass):
    """Packed rows with a block-diagonal AttentionMask from segment ids (--pack_args mode=attention_mask)."""

    Options = packing.PackOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        setup = packing.prepare(graph, ctx, self.options, self.name, one_row=True)
        if setup.attention_mask is None:
            raise PoprtError(f"{self.name} needs an '{self.options.attention_mask_name}' input to carry the segment ids")
        dims = setup.dims
        cone = attention_cone(graph, setup.blocks)
        tail = {id(n) for n in graph.nodes if id(n) not in cone}
        _refuse_row_dependent_terms(graph, setup)
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
        packing.account_masks(ctx, setup.blocks, lambda block: block.softmax)
        placement = _Placement(graph, self.options.max_valid_num, self.options.segment_max_size, setup.attention_mask)
        layouts = pack_tail.place_tail(graph, tail, dims, setup.attention_mask, placement)
        placement.zero_one_mask()
        packing.record(ctx, MODE, self.options, layouts)
        return PassResult(changed=True, message=f"{len(setup.blocks)} attention blocks masked by segment")


class _Placement(pack_tail.TailPlacement):
    mode = MODE

    def __init__(self, graph: gs.Graph, max_valid_num: int, segment_max_size: int, mask: gs.Tensor) -> None:
        super().__init__(graph, max_valid_num, segment_max_size)
        self.mask = mask

    def pool(self, head: PoolingHead) -> gs.Tensor:
        return self.node(
            "SegmentPool",
            [head.hidden, self.mask],
            f"{head.output.name}_segment_pool",
            np.float32,
            {"max_valid_num": self.max_valid_num, "mode": SEGMENT_POOL_MODES[head.kind]},
            ops.DOMAIN,
        )

    def token_output(self, index: int, output: gs.Tensor) -> Layout:
        return Layout.packed

    def refusal(self, node: gs.Node, why: str) -> str:
        return f"{self.mode} packing cannot keep node '{node.name}' ({node.op}) per request: it {why}; use mode=unpack_repack"

    def zero_one_mask(self) -> None:
        """Give the mask's readers other than poprt-lite's own ops (AttentionMask, SegmentPool, which
        read segment ids) its 0/1 view: the exporter's mask computations (dead now), the embeddings
        DeBERTa multiplies by the mask, an output echoing it."""
        readers = [n for n in self.mask.outputs if n.domain != ops.DOMAIN]
        if not readers:
            return
        one = self.const(f"{self.mask.name}_one", np.ones((), np.dtype(self.mask.dtype)))
        padding = self.node("Min", [self.mask, one], f"{self.mask.name}_zero_one", self.mask.dtype)
        for node in readers:
            for i, tensor in enumerate(node.inputs):
                if tensor is self.mask:
                    node.inputs[i] = padding


def _mask_dtype(scores: gs.Tensor) -> int:
    return onnx.TensorProto.FLOAT16 if scores.dtype == np.float16 else onnx.TensorProto.FLOAT


def _refuse_row_dependent_terms(graph: gs.Graph, setup: packing.PackSetup) -> None:
    """Every score term the packed row keeps must be right for the tokens of one request wherever
    the request lies in the row: positions it sees only as differences are (relative positions, a
    band, a causal mask); absolute positions in the row are not, and only mode=unpack_repack
    recomputes a term on each request's own positions. Terms that read no activations are checked
    by value (`mask_terms.check_shift_invariant`); the others (DeBERTa's c2p) by structure."""
    declared = tuple(setup.input_ids.shape[:2])
    for block in setup.blocks:
        for term in block.terms:
            for bias in term.biases:
                sources = relative_position_sources(bias, setup.content)
                if sources:
                    raise PoprtError(
                        f"{MODE} packing cannot keep the score term that node '{term.node.name}' adds before Softmax '{block.softmax.name}': "
                        f"it uses absolute positions in the row (node '{sources[0].name}' ({sources[0].op})), which do not restart at each request; use {option('pack_args')} mode=unpack_repack"
                    )
                if not mask_terms.reads_content(bias, setup.content):
                    if mask_terms.shift_invariant(graph, bias, setup.attention_mask, declared, setup.row, setup.content) is False:
                        raise PoprtError(_refusal(block, term.node, bias, setup.content))
        for node, tensor in block.combined:
            if mask_terms.reads_content(tensor, setup.content) or not mask_terms.shift_invariant(graph, tensor, setup.attention_mask, declared, setup.row, setup.content):
                raise PoprtError(_refusal(block, node, tensor, setup.content, combined=True))


def _refusal(block, node: gs.Node, tensor: gs.Tensor, content: set[int], combined: bool = False) -> str:
    what, verb = ("the score term", "adds") if node.op == "Add" else ("the attention mask", "applies")
    made_of = "it combines the padding mask with" if combined else "it is"
    return (
        f"{MODE} packing cannot keep {what} that node '{node.name}' ({node.op}) {verb} before Softmax '{block.softmax.name}': "
        f"{made_of} {mask_terms.describe(tensor, content)}, which is not the same for a request placed later in a packed row "
        f"as for the request alone; use {option('pack_args')} mode=unpack_repack, which recomputes it on each request's own row"
    )
