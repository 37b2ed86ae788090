"""Recomputing attention blocks on per-request rows (shared by the unpack/repack-style passes).

Not a pass: `pack_unpack_repack` (and passes that unpack the same way) hand it how to unpack a
packed tensor and what shape its rows have; it rebuilds each block between those boundaries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError
from poprt_lite.patterns.attention import AttentionBlock

# Ops between the context MatMul and the first per-token tensor after it (merging the heads back).
HEAD_MERGE_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")


class RowRebuilder:
    """Recompute attention blocks on per-request rows.

    A block reads the packed activations through *boundary* tensors: the last per-token tensors
    (`[batch, seq, ...]`, `is_token_major`) on the way to its Q, K, V and score terms. Everything
    between those boundaries and the first per-token tensor after its context MatMul is rebuilt:
    each node is cloned with its inputs replaced by their row twins, a boundary read by value
    becomes `unpack(boundary)` and a boundary read by `Shape` the shape its rows have
    (`row_shape(boundary)`). The exporter's own shape arithmetic then follows the rows, and so do
    position biases computed from a sequence length: `Range(0, seq)` counts each request's own
    positions, from 0. Nodes that read no packed tensor (constants, weights of the relative
    embeddings) are shared, and clones are shared between blocks (a bias computed once for all
    layers is rebuilt once). The packed originals are left dead.
    """

    def __init__(
        self,
        graph: gs.Graph,
        is_token_major: Callable[[gs.Tensor], bool],
        unpack: Callable[[gs.Tensor], gs.Tensor],
        row_shape: Callable[[gs.Tensor], gs.Tensor],
    ) -> None:
        self.graph = graph
        self.is_token_major = is_token_major
        self.unpack = unpack
        self.row_shape = row_shape
        self.twins: dict[int, gs.Tensor] = {}
        self._fresh = ir.FreshNames(graph)

    def end_of(self, block: AttentionBlock) -> gs.Tensor:
        """The first per-token tensor after the block's context MatMul (heads merged back)."""
        tensor = block.context.outputs[0]
        for _ in range(6):
            if self.is_token_major(tensor):
                return tensor
            data = [n for n in tensor.outputs if n.op != "Shape"]
            if len(data) != 1 or data[0].op not in HEAD_MERGE_OPS or data[0].inputs[0] is not tensor:
                break
            tensor = data[0].outputs[0]
        raise PoprtError(
            f"attention at Softmax '{block.softmax.name}': no per-token [batch, seq, ...] tensor follows its context MatMul '{block.context.name}' through {', '.join(HEAD_MERGE_OPS)}; cannot repack it"
        )

    def rows_of(self, tensor: gs.Tensor) -> gs.Tensor:
        """`tensor` (a per-token tensor after a block) recomputed on rows: its producer cloned."""
        return self._clone(tensor.inputs[0], tensor)

    def twin(self, tensor: gs.Tensor) -> gs.Tensor:
        if id(tensor) in self.twins:
            return self.twins[id(tensor)]
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or isinstance(tensor, gs.Constant):
            result = self.unpack(tensor) if self.is_token_major(tensor) else tensor
        elif self.is_token_major(tensor):
            result = self.unpack(tensor)
        else:
            result = self._clone(node, tensor)
        self.twins[id(tensor)] = result
        return result

    def _clone(self, node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
        if node.op == "Shape" and self.is_token_major(node.inputs[0]):
            return self._sliced_shape(node, self.row_shape(node.inputs[0]))
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            raise PoprtError(f"node '{node.name}' ({node.op}) has a subgraph; it cannot be recomputed on per-request rows")
        inputs = [self.twin(t) if t.name else t for t in node.inputs]
        if all(a is b for a, b in zip(inputs, node.inputs)) and not self.is_token_major(tensor):
            return tensor  # reads nothing packed: shared
        outputs = [gs.Variable(self._fresh(f"{o.name}_rows"), dtype=o.dtype) for o in node.outputs]
        self.graph.nodes.append(gs.Node(node.op, node.name and f"{node.name}_rows", dict(node.attrs), inputs, outputs, domain=node.domain))
        for original, clone in zip(node.outputs, outputs):
            self.twins[id(original)] = clone
        return outputs[node.outputs.index(tensor)]

    def _sliced_shape(self, node: gs.Node, shape: gs.Tensor) -> gs.Tensor:
        """`Shape(x, start, end)` (opset 15) of rows whose full shape is `shape`."""
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        if start == 0 and end is None:
            return shape
        starts = gs.Constant(self._fresh("shape_start"), values=np.asarray([start], np.int64))
        ends = gs.Constant(self._fresh("shape_end"), values=np.asarray([end if end is not None else 2**62], np.int64))
        out = gs.Variable(self._fresh(f"{node.outputs[0].name}_rows"), dtype=node.outputs[0].dtype)
        self.graph.nodes.append(gs.Node("Slice", inputs=[shape, starts, ends], outputs=[out]))
        return out
