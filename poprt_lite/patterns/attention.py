"""Finding multi-head attention blocks by structure, and what their scores are made of.

A block is `MatMul(Q, K^T)` -> the score path -> `Softmax` -> optional guards (the
`Where(IsNaN(p), 0, p)` of sdpa exports, Cast, Dropout, Identity, a Reshape) -> `MatMul(P, V)`.
The score path is any chain of
- scales: Mul/Div by a constant (the scale may also sit on Q and K before the MatMul, dynamo);
- pass-throughs (Cast, Dropout, Identity) and Reshapes (DeBERTa views `[B*H,S,S]` as `[B,H,S,S]`);
- additive terms, `Add(scores, term)`: the padding mask, a relative-position bias (MPNet, T5),
  DeBERTa's disentangled content-to-position and position-to-content scores. A term that is itself
  a sum is taken apart into its summands (T5 adds the mask to the bias before the scores);
- masks as `Where(keep, scores, fill)` with a constant fill (masked_fill).
Q, K and V may be `[batch, heads, seq, head_dim]` or `[batch*heads, seq, head_dim]` (DeBERTa): the
Softmax input must be `[batch, heads, seq, seq]`.

A summand is a *mask* when it reads one of the padding-mask inputs by value (not only its shape)
without going through the activations (`token_content`: what depends on the token ids by value);
every other summand is a *bias*. Biases
stay: `relative_position_sources` tells whether a bias sees positions in the row only as differences
(then packed rows keep it right for the pairs of one request); `passes/attention_rows.py` recomputes
a block with everything it reads (biases included) on per-request rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import onnx_graphsurgeon as gs

from poprt_lite import ir
from poprt_lite.errors import PoprtError

SCALE_OPS = ("Mul", "Div")
PASS_THROUGH_OPS = ("Cast", "Dropout", "Identity")
VIEW_OPS = ("Reshape",)
# Ops onnxruntime's transformer optimizer fuses attention into; their layout is not ours to rewrite.
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention")
MAX_PATH = 12  # nodes between the score MatMul and the Softmax
# Inputs that only carry sizes (shapes, axes, repeats, slice bounds), not values that end up in the output.
SIZE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Slice": (1, 2, 3, 4),
    "Unsqueeze": (1,), "Squeeze": (1,), "Pad": (1, 2, 3), "ReduceSum": (1,), "ReduceMean": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "Split": (1,), "Resize": (1, 2, 3),
}  # fmt: skip


@dataclass
class ScoreTerm:
    """What `node` (an Add on the score path) adds to the scores: `node.inputs[index]`, as summands."""

    node: gs.Node
    index: int
    summands: list[gs.Tensor]
    masks: list[gs.Tensor]  # the summands that are padding masks

    @property
    def biases(self) -> list[gs.Tensor]:
        return [t for t in self.summands if not any(t is m for m in self.masks)]


@dataclass
class AttentionBlock:
    scores: gs.Node  # MatMul(Q, K^T)
    softmax: gs.Node
    context: gs.Node  # MatMul(P, V)
    path: list[gs.Node] = field(default_factory=list)  # score MatMul -> Softmax, Softmax side first
    terms: list[ScoreTerm] = field(default_factory=list)
    where_masks: list[gs.Node] = field(default_factory=list)  # Where(keep, scores, fill) on the path

    @property
    def query(self) -> gs.Tensor:
        return self.scores.inputs[0]

    @property
    def key_transposed(self) -> gs.Tensor:
        return self.scores.inputs[1]

    @property
    def value(self) -> gs.Tensor:
        return self.context.inputs[1]

    @property
    def biases(self) -> list[gs.Tensor]:
        """The additive score terms that are not masks (relative-position bias, c2p, p2c)."""
        return [t for term in self.terms for t in term.biases]

    @property
    def masked(self) -> bool:
        return bool(self.where_masks or any(term.masks for term in self.terms))


def find_attention_blocks(graph: gs.Graph, mask_inputs: Iterable[str] = (), token_inputs: Iterable[str] = ()) -> list[AttentionBlock]:
    """The attention blocks of `graph`. A score summand is a mask when it reads a graph input named in
    `mask_inputs` by value, not through the activations (what depends on `token_inputs` by value)."""
    fused = [n for n in graph.nodes if n.op in FUSED_ATTENTION_OPS]
    if fused:
        raise PoprtError(
            f"node '{fused[0].name}' is a fused {fused[0].op} op; packing needs the unfused attention (run poprt-lite before onnxruntime's transformer optimizer)"
        )
    mask_inputs = set(mask_inputs)
    blocks = []
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        path = _score_path(softmax.inputs[0])
        context = _context_of(softmax.outputs[0])
        if path is None or context is None:
            continue
        scores, path = path[-1], path[:-1]
        shape = softmax.inputs[0].shape
        if shape is not None and len(shape) != 4:
            raise PoprtError(
                f"attention at Softmax '{softmax.name}' works on rank-{len(shape)} scores; packing supports [batch, heads, seq, seq] scores"
            )
        blocks.append(AttentionBlock(scores, softmax, context, path))
    if blocks:
        content = token_content(graph, token_inputs)
        for block in blocks:
            _read_terms(block, content, mask_inputs)
    return blocks


def is_constant(tensor: gs.Tensor) -> bool:
    """An initializer, or the output of a Constant node (TorchScript exports keep those)."""
    return isinstance(tensor, gs.Constant) or bool(tensor.inputs and tensor.inputs[0].op == "Constant")


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _is_score_matmul(node: gs.Node | None) -> bool:
    return node is not None and node.op == "MatMul" and not any(is_constant(t) for t in node.inputs)


def _path_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs through which the scores may reach `node` on a score path."""
    if node.op in SCALE_OPS:
        data, factor = node.inputs
        if is_constant(factor):
            return [data]
        return [factor] if node.op == "Mul" and is_constant(data) else []
    if node.op in PASS_THROUGH_OPS or node.op in VIEW_OPS:
        return [node.inputs[0]]
    if node.op == "Add":
        return [t for t in node.inputs if not is_constant(t)]
    if node.op == "Where":
        branches = [t for t in node.inputs[1:] if not is_constant(t)]
        return branches if len(branches) == 1 else []
    return []


def _score_path(tensor: gs.Tensor) -> list[gs.Node] | None:
    """The nodes from the Softmax input back to the one score MatMul (last), or None."""
    found: list[list[gs.Node]] = []

    def walk(t: gs.Tensor, path: list[gs.Node]) -> None:
        node = _producer(t)
        if node is None or len(path) > MAX_PATH or any(node is p for p in path):
            return
        if _is_score_matmul(node):
            found.append([*path, node])
            return
        for source in _path_inputs(node):
            walk(source, [*path, node])

    walk(tensor, [])
    matmuls = {id(p[-1]) for p in found}
    return found[0] if len(matmuls) == 1 and len(found) == 1 else None


def _context_of(tensor: gs.Tensor) -> gs.Node | None:
    """Walk forward from the Softmax output to the MatMul with V, through guards and views."""
    for _ in range(5):
        consumers = [n for n in tensor.outputs if n.op not in ("IsNaN", "Shape")]
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op == "MatMul" and node.inputs[0] is tensor:
            return node
        if node.op in PASS_THROUGH_OPS or (node.op in VIEW_OPS and node.inputs[0] is tensor):
            tensor = node.outputs[0]
        elif node.op == "Where" and node.inputs[2] is tensor and _producer(node.inputs[0]) is not None and _producer(node.inputs[0]).op == "IsNaN":
            tensor = node.outputs[0]  # sdpa's NaN guard for fully masked rows
        else:
            return None
    return None


def token_content(graph: gs.Graph, token_inputs: Iterable[str]) -> set[int]:
    """ids of the tensors whose values depend on the graph inputs `token_inputs` (the token ids):
    the activations. What depends on them only through `Shape` (sizes, positions) is not content."""
    names = set(token_inputs)
    frontier = [t for t in graph.inputs if t.name in names]
    content = {id(t) for t in frontier}
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if node.op in ("Shape", "Size"):
                continue
            for out in node.outputs:
                if id(out) not in content:
                    content.add(id(out))
                    frontier.append(out)
    return content


def _read_terms(block: AttentionBlock, content: set[int], mask_inputs: set[str]) -> None:
    on_path = {id(n) for n in block.path} | {id(block.scores)}
    for node in block.path:
        if node.op == "Where":
            block.where_masks.append(node)
        elif node.op == "Add":
            for index, tensor in enumerate(node.inputs):
                producer = _producer(tensor)
                if producer is not None and id(producer) in on_path:
                    continue
                summands = _summands(tensor)
                masks = [t for t in summands if _reads_inputs(t, content) & mask_inputs]
                block.terms.append(ScoreTerm(node, index, summands, masks))


def _summands(tensor: gs.Tensor) -> list[gs.Tensor]:
    node = _producer(tensor)
    if node is not None and node.op == "Add":
        return [s for t in node.inputs for s in _summands(t)]
    return [tensor]


def _reads_inputs(tensor: gs.Tensor, content: set[int]) -> set[str]:
    """Names of the graph inputs whose values reach `tensor` without passing through `content`."""
    seen: set[int] = set()
    found: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        node = _producer(t)
        if id(t) in content:
            continue
        if node is None:
            if isinstance(t, gs.Variable):
                found.add(t.name)
            continue
        if id(node) in seen or node.op == "Shape":
            continue
        seen.add(id(node))
        stack.extend(node.inputs)
    return found


def _dag(graph: gs.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(id(node))
        for tensor in node.inputs:
            for producer in tensor.inputs:
                dag.add_edge(id(producer), id(node))
    return dag


def apply_mask(graph: gs.Graph, block: AttentionBlock, mask: gs.Tensor) -> None:
    """Mask the block's scores with the additive `mask` instead of whatever masks it had.

    Masks on the path are taken out (a Where is bypassed, a mask summand dropped from its term) and
    `mask` is added to the Softmax input; the old mask computations are left dead, for the clean-up.
    """
    for node in block.where_masks:
        keep = next(t for t in node.inputs[1:] if not is_constant(t))
        ir.replace_all_uses(node.outputs[0], keep)
    for term in block.terms:
        if not term.masks:
            continue
        kept = term.biases
        if not kept:
            scores = term.node.inputs[1 - term.index]
            ir.replace_all_uses(term.node.outputs[0], scores)
            continue
        total = kept[0]
        for summand in kept[1:]:
            total = _add(graph, total, summand, f"{term.node.outputs[0].name}_bias")
        term.node.inputs[term.index] = total
    unmasked = block.softmax.inputs[0]
    block.softmax.inputs[0] = _add(graph, unmasked, mask, f"{unmasked.name}_masked")


def _add(graph: gs.Graph, a: gs.Tensor, b: gs.Tensor, name: str) -> gs.Variable:
    out = gs.Variable(ir.unique_name(graph, name), dtype=a.dtype)
    graph.nodes.append(gs.Node("Add", inputs=[a, b], outputs=[out]))
    return out



def relative_position_sources(tensor: gs.Tensor, content: set[int] = frozenset()) -> list[gs.Node]:
    """The Range nodes whose positions reach `tensor` other than as differences.

    Positions made by `Range` over a sequence length are absolute positions in the row; a difference
    of two of them (`Sub`) is a relative position, which a packed row keeps for the tokens of one
    request. Empty when every position reaches `tensor` only through such differences (MPNet's and
    T5's bias, DeBERTa's c2p/p2c). The walk stops at `content` (ids of tensors, `token_content`:
    per-token values are right in packed rows) and ignores inputs that only carry sizes (shapes,
    axes, slice bounds).
    """
    stop = content
    memo: dict[int, tuple[str, list[gs.Node]]] = {}

    def kind(t: gs.Tensor) -> tuple[str, list[gs.Node]]:
        if id(t) in memo:
            return memo[id(t)]
        memo[id(t)] = ("none", [])  # cycles cannot happen in a valid graph; guard anyway
        node = _producer(t)
        if node is None or id(t) in stop or is_constant(t) or node.op == "Shape":
            result = ("none", [])
        elif node.op == "Range":
            result = ("none", []) if all(is_constant(i) for i in node.inputs) else ("absolute", [node])
        else:
            sizes = SIZE_INPUTS.get(node.op, ())
            kinds = [kind(i) for n, i in enumerate(node.inputs) if n not in sizes and i.name]
            absolute = [k for k in kinds if k[0] == "absolute"]
            if node.op == "Sub" and len(absolute) == 2:
                result = ("relative", [])
            elif absolute:
                result = ("absolute", [r for k in absolute for r in k[1]])
            elif any(k[0] == "relative" for k in kinds):
                result = ("relative", [])
            else:
                result = ("none", [])
        memo[id(t)] = result
        return result

    sources = kind(tensor)[1]
    unique: dict[int, gs.Node] = {id(n): n for n in sources}
    return list(unique.values())


def attention_cone(graph: gs.Graph, blocks: list[AttentionBlock]) -> set[int]:
    """ids of the nodes that feed some attention block (and the blocks' own nodes): the encoder.

    What lies outside is the tail after the last block (and side branches into it), the only place
    where a sequence-level op (pooling) may need the per-request layout.
    """
    dag = _dag(graph)
    cone: set[int] = set()
    for block in blocks:
        for node in (block.scores, block.softmax, block.context):
            cone.add(id(node))
            cone |= nx.ancestors(dag, id(node))
    return cone
