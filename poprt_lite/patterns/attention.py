"""Finding multi-head attention blocks by structure.

A block is `MatMul(Q, K^T)` -> optional scale (Mul/Div by a constant) -> mask (`Add(scores, mask)`
or a boolean `Where(keep, scores, fill)`) -> `Softmax` -> optional guards (the `Where(IsNaN(p), 0, p)` of sdpa exports, Cast, Dropout,
Identity) -> `MatMul(P, V)`. Q, V and the context are `[batch, heads, seq, head_dim]`, K^T is
`[batch, heads, head_dim, seq]`; the scale may also sit on Q and K before the MatMul (dynamo).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError

SCALE_OPS = ("Mul", "Div")
PASS_THROUGH_OPS = ("Cast", "Dropout", "Identity")
# Ops onnxruntime's transformer optimizer fuses attention into; their layout is not ours to rewrite.
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention")


@dataclass
class AttentionBlock:
    scores: gs.Node  # MatMul(Q, K^T)
    softmax: gs.Node
    context: gs.Node  # MatMul(P, V)
    mask_node: gs.Node | None  # the Add or Where that masks the scores, if the model masks
    unmasked: gs.Tensor  # the scores before masking

    @property
    def query(self) -> gs.Tensor:
        return self.scores.inputs[0]

    @property
    def key_transposed(self) -> gs.Tensor:
        return self.scores.inputs[1]

    @property
    def value(self) -> gs.Tensor:
        return self.context.inputs[1]


def find_attention_blocks(graph: gs.Graph) -> list[AttentionBlock]:
    fused = [n for n in graph.nodes if n.op in FUSED_ATTENTION_OPS]
    if fused:
        raise PoprtError(
            f"node '{fused[0].name}' is a fused {fused[0].op} op; packing needs the unfused attention (run poprt-lite before onnxruntime's transformer optimizer)"
        )
    blocks = []
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        found = _scores_of(softmax.inputs[0])
        context = _context_of(softmax.outputs[0])
        if found is None or context is None:
            continue
        scores, mask_node, unmasked = found
        for tensor, rank in ((scores.inputs[0], 4), (scores.inputs[1], 4), (context.inputs[1], 4)):
            if tensor.shape is not None and len(tensor.shape) != rank:
                raise PoprtError(
                    f"attention at Softmax '{softmax.name}' works on rank-{len(tensor.shape)} tensors; packing supports [batch, heads, seq, head_dim] attention"
                )
        blocks.append(AttentionBlock(scores, softmax, context, mask_node, unmasked if mask_node else softmax.inputs[0]))
    return blocks


def is_constant(tensor: gs.Tensor) -> bool:
    """An initializer, or the output of a Constant node (TorchScript exports keep those)."""
    return isinstance(tensor, gs.Constant) or bool(tensor.inputs and tensor.inputs[0].op == "Constant")


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _is_score_matmul(node: gs.Node | None) -> bool:
    return node is not None and node.op == "MatMul" and not any(is_constant(t) for t in node.inputs)


def _scores_of(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node | None, gs.Tensor | None] | None:
    """Walk back from the Softmax input to the score MatMul, noting the masking node on the way."""
    mask_node, unmasked = None, None
    for _ in range(6):
        node = _producer(tensor)
        if node is None:
            return None
        if _is_score_matmul(node):
            return node, mask_node, unmasked
        if node.op in SCALE_OPS and is_constant(node.inputs[1]):
            tensor = node.inputs[0]
        elif node.op in PASS_THROUGH_OPS:
            tensor = node.inputs[0]
        elif node.op in ("Add", "Where") and mask_node is None:
            candidates = node.inputs if node.op == "Add" else node.inputs[1:]
            score_side = [t for t in candidates if _reaches_score_matmul(t)]
            if len(score_side) != 1 or (node.op == "Where" and not any(is_constant(t) for t in candidates)):
                return None
            mask_node, unmasked = node, score_side[0]
            tensor = unmasked
        else:
            return None
    return None


def _reaches_score_matmul(tensor: gs.Tensor) -> bool:
    for _ in range(4):
        node = _producer(tensor)
        if _is_score_matmul(node):
            return True
        if node is None or not (
            (node.op in SCALE_OPS and is_constant(node.inputs[1])) or node.op in PASS_THROUGH_OPS
        ):
            return False
        tensor = node.inputs[0]
    return False


def _context_of(tensor: gs.Tensor) -> gs.Node | None:
    """Walk forward from the Softmax output to the MatMul with V, through guards."""
    for _ in range(4):
        consumers = [n for n in tensor.outputs if n.op != "IsNaN"]
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op == "MatMul" and node.inputs[0] is tensor:
            return node
        if node.op in PASS_THROUGH_OPS:
            tensor = node.outputs[0]
        elif node.op == "Where" and node.inputs[2] is tensor and _producer(node.inputs[0]) is not None and _producer(node.inputs[0]).op == "IsNaN":
            tensor = node.outputs[0]  # sdpa's NaN guard for fully masked rows
        else:
            return None
    return None


def apply_mask(graph: gs.Graph, block: AttentionBlock, mask: gs.Tensor) -> None:
    """Mask the block's scores with the additive `mask` instead of whatever mask it had."""
    masked = gs.Variable(f"{block.unmasked.name}_masked", dtype=block.unmasked.dtype)
    graph.nodes.append(gs.Node("Add", inputs=[block.unmasked, mask], outputs=[masked]))
    if block.mask_node is None:
        block.softmax.inputs[0] = masked
    else:  # the old mask computation is left dead, for the clean-up
        ir.replace_all_uses(block.mask_node.outputs[0], masked)


def attention_cone(graph: gs.Graph, blocks: list[AttentionBlock]) -> set[int]:
    """ids of the nodes that feed some attention block (and the blocks' own nodes): the encoder.

    What lies outside is the tail after the last block (and side branches into it), the only place
    where a sequence-level op (pooling) may need the per-request layout.
    """
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(id(node))
        for tensor in node.inputs:
            for producer in tensor.inputs:
                dag.add_edge(id(producer), id(node))
    cone: set[int] = set()
    for block in blocks:
        for node in (block.scores, block.context):
            cone.add(id(node))
            cone |= nx.ancestors(dag, id(node))
    return cone
