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

A summand *reads the mask* when it reads one of the padding-mask inputs by value (not only its
shape) without going through the activations (`token_content`: what depends on the token ids by
value); every other summand is a *bias*. Which of the mask-reading summands (and which Where
conditions) are the padding mask and nothing else is proven by evaluating them
(`patterns/mask_terms.py`): only those are `masks`, the terms `apply_mask` may drop; a summand that
combines the padding mask with more (a sliding-window band, a causal mask) is `combined` and stays.
Biases stay: `relative_position_sources` tells whether a bias sees positions in the row only as differences
(then packed rows keep it right for the pairs of one request); `passes/attention_rows.py` recomputes
a block with everything it reads (biases included) on per-request rows.

Per-token views: `token_view_source` finds the per-token tensor `[B,S,hidden]` that Q, K^T or V
is a view of (Reshapes, Transposes, constant scalar scales; checked on indices, not by op names),
`token_view_of_context` the per-token view of a block's context, and `plain_score_scale` /
`plain_probabilities` whether a block has nothing but scales and one mask between its MatMuls
(what `passes/fuse_packed_attention.py` fuses).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
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
    mask_readers: list[gs.Tensor]  # the summands that read the padding mask
    masks: list[gs.Tensor] = field(default_factory=list)  # of those, the ones proven to be the padding mask alone

    @property
    def biases(self) -> list[gs.Tensor]:
        """The summands that do not read the padding mask (relative-position bias, c2p, p2c)."""
        return [t for t in self.summands if not any(t is m for m in self.mask_readers)]

    @property
    def combined(self) -> list[gs.Tensor]:
        """The summands that read the padding mask and are not (proven to be) the padding mask alone."""
        return [t for t in self.mask_readers if not any(t is m for m in self.masks)]


@dataclass
class AttentionBlock:
    scores: gs.Node  # MatMul(Q, K^T)
    softmax: gs.Node
    context: gs.Node  # MatMul(P, V)
    path: list[gs.Node] = field(default_factory=list)  # score MatMul -> Softmax, Softmax side first
    terms: list[ScoreTerm] = field(default_factory=list)
    where_masks: list[gs.Node] = field(default_factory=list)  # Where(keep, scores, fill) on the path
    padding_wheres: list[gs.Node] = field(default_factory=list)  # of those, the ones proven to mask padding alone

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
        """Is one of its masks proven to be the padding mask (`mask_terms.prove_padding_masks`)?"""
        return bool(self.padding_wheres or any(term.masks for term in self.terms))

    @property
    def combined(self) -> list[tuple[gs.Node, gs.Tensor]]:
        """What masks the scores besides the padding mask, as (node, tensor): the `combined` summands
        of the terms (node: the Add) and the conditions of the Wheres not proven to mask padding alone."""
        wheres = [(n, n.inputs[0]) for n in self.where_masks if not any(n is w for w in self.padding_wheres)]
        return [(term.node, t) for term in self.terms for t in term.combined] + wheres


def find_attention_blocks(graph: gs.Graph, mask_inputs: Iterable[str] = (), token_inputs: Iterable[str] = ()) -> list[AttentionBlock]:
    """The attention blocks of `graph`. A score summand is a mask when it reads a graph input named in
    `mask_inputs` by value, not through the activations (what depends on `token_inputs` by value)."""
    fused = [n for n in graph.nodes if n.op in FUSED_ATTENTION_OPS]
    if fused:
        raise PoprtError(
            f"node '{fused[0].name}' is a fused {fused[0].op} op (onnxruntime's transformer optimizer); run unfuse_ort before packing (the default pipeline does)"
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


def producer(tensor: gs.Tensor, ops: Iterable[str] | None = None) -> gs.Node | None:
    """The node that writes `tensor`, if any (and if its op is one of `ops`)."""
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and (ops is None or node.op in ops) else None


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
        node = producer(t)
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
        elif _is_nan_guard(node, tensor):
            tensor = node.outputs[0]
        else:
            return None
    return None


def _is_nan_guard(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Is `node` sdpa's guard for fully masked rows, `Where(IsNaN(p), fill, p)`, on `tensor` (p)?"""
    return node.op == "Where" and node.inputs[2] is tensor and producer(node.inputs[0]) is not None and producer(node.inputs[0]).op == "IsNaN"


def nan_guards(block: AttentionBlock) -> list[gs.Node]:
    """The NaN guards (`_is_nan_guard`) between the block's Softmax and its MatMul with V."""
    guards, tensor = [], block.softmax.outputs[0]
    while tensor is not block.context.inputs[0]:
        node = next((n for n in tensor.outputs if n.op not in ("IsNaN", "Shape")), None)
        if node is None:
            break
        if _is_nan_guard(node, tensor):
            guards.append(node)
        tensor = node.outputs[0]
    return guards


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
                writer = producer(tensor)
                if writer is not None and id(writer) in on_path:
                    continue
                summands = _summands(tensor)
                readers = [t for t in summands if _reads_inputs(t, content) & mask_inputs]
                block.terms.append(ScoreTerm(node, index, summands, readers))


def _summands(tensor: gs.Tensor) -> list[gs.Tensor]:
    node = producer(tensor)
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
        node = producer(t)
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
    """Mask the block's scores with the additive `mask` instead of the padding mask they had.

    Only what is proven to be the padding mask alone (`mask_terms.prove_padding_masks`) is taken out
    (a Where bypassed, a summand dropped from its term); whatever else masks the scores (`combined`)
    stays, and `mask` is added to the Softmax input. The old mask computations are left dead, for
    the clean-up.
    """
    for node in block.padding_wheres:
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
        node = producer(t)
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


# ------------------------------------------------------------------ per-token views of the heads

QUERY_HEADS = (0, 2, 1, 3)  # [B,S,H,d] -> [B,H,S,d]: Q and V as the score and context MatMuls read them
KEY_HEADS = (0, 2, 3, 1)  # [B,S,H,d] -> [B,H,d,S]: K^T
VIEW_CHAIN_OPS = ("Reshape", "Transpose", "Identity")


@dataclass
class TokenView:
    """A tensor in the heads layout that is a view of the per-token tensor `source` [B,S,H*d],
    times `scale` (constant scalar Mul/Div on the way)."""

    source: gs.Tensor
    scale: float


def scalar_factor(node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """`(data, f)` when `node` is `data * f` for a constant scalar f (a Mul by f, or a Div by 1/f), else None."""
    if node.op not in SCALE_OPS or len(node.inputs) != 2:
        return None
    pairs = [(node.inputs[0], node.inputs[1])]
    if node.op == "Mul":
        pairs.append((node.inputs[1], node.inputs[0]))
    for data, factor in pairs:
        value = constant_array(factor)
        if value is not None and value.size == 1 and not is_constant(data):
            f = float(value.reshape(()))
            return data, (f if node.op == "Mul" else 1.0 / f)
    return None


def token_view_source(tensor: gs.Tensor, batch: int, seq: int, heads: int, perm: tuple[int, ...], scaled: bool = True) -> TokenView | None:
    """Walk back from `tensor` (Q, K^T or V as the attention MatMuls read it) through Reshapes,
    Transposes and (if `scaled`) constant scalar scales to the per-token tensor `[batch, seq, hidden]`
    it views as `source.reshape(batch, seq, heads, d).transpose(perm)`; None if it is anything else.
    The views are checked by applying them to the indices of the source, so any chain of views that
    ends in that layout is found (dynamo's `[B*H, S, d]` detours included)."""
    shape = _static_shape(tensor)
    if shape is None or len(shape) != 4:
        return None
    head_dim = shape[perm.index(3)]
    hidden = heads * head_dim
    views: list[gs.Node] = []
    scale = 1.0
    while _static_shape(tensor) != [batch, seq, hidden]:
        node = producer(tensor)
        if node is None or len(views) > MAX_PATH:
            return None
        factor = scalar_factor(node) if scaled else None
        if factor is not None:
            tensor, f = factor
            scale *= f
        elif node.op in VIEW_CHAIN_OPS and (node.op != "Reshape" or constant_array(node.inputs[1]) is not None):
            views.append(node)
            tensor = node.inputs[0]
        else:
            return None
    index = np.arange(batch * seq * hidden, dtype=np.int32).reshape(batch, seq, hidden)
    viewed = _apply_views(index, reversed(views))
    want = index.reshape(batch, seq, heads, head_dim).transpose(perm)
    if viewed is None or viewed.shape != want.shape or not np.array_equal(viewed, want):
        return None
    return TokenView(tensor, scale)


def token_view_of_context(tensor: gs.Tensor, batch: int, seq: int, heads: int) -> gs.Tensor | None:
    """Walk forward from the context `[batch, heads, seq, d]` (the output of MatMul(P, V)) through
    Reshapes and Transposes, each the only reader of its input, to the per-token tensor
    `[batch, seq, heads*d]` (`context.transpose(0, 2, 1, 3).reshape(batch, seq, hidden)`); None if
    the chain is anything else or the tensor is also a graph output."""
    shape = _static_shape(tensor)
    if shape is None or shape[:3] != [batch, heads, seq] or len(shape) != 4:
        return None
    hidden = heads * shape[3]
    index = np.arange(batch * seq * hidden, dtype=np.int32).reshape(batch, heads, seq, shape[3])
    views: list[gs.Node] = []
    while _static_shape(tensor) != [batch, seq, hidden]:
        if len(tensor.outputs) != 1 or len(views) > MAX_PATH:
            return None
        node = tensor.outputs[0]
        if node.op not in VIEW_CHAIN_OPS or node.inputs[0] is not tensor or (node.op == "Reshape" and constant_array(node.inputs[1]) is None):
            return None
        views.append(node)
        tensor = node.outputs[0]
    viewed = _apply_views(index, views)
    want = index.transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
    if viewed is None or viewed.shape != want.shape or not np.array_equal(viewed, want):
        return None
    return tensor


def _apply_views(array: np.ndarray, views: Iterable[gs.Node]) -> np.ndarray | None:
    """`array` through the Reshape / Transpose / Identity nodes `views` in order, as onnx defines them."""
    for node in views:
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            array = array.transpose(perm) if perm is not None else array.T
        elif node.op == "Reshape":
            target = [int(v) for v in constant_array(node.inputs[1]).reshape(-1)]
            if not node.attrs.get("allowzero", 0):
                target = [array.shape[i] if v == 0 else v for i, v in enumerate(target)]
            try:
                array = array.reshape(target)
            except ValueError:
                return None
    return array


def _static_shape(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return list(shape)


def constant_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        tensor = tensor.inputs[0].attrs.get("value")
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def plain_score_scale(block: AttentionBlock, mask: gs.Tensor) -> float | None:
    """For a block whose scores get nothing but constant scalar scales and `mask` (one Add, `mask`
    its only summand) on the way to a Softmax over the last axis, the product of those scales; None
    for any other block (a bias such as MPNet's or DeBERTa's, a Where mask, a view, a Cast)."""
    if block.where_masks or len(block.terms) != 1 or block.softmax.attrs.get("axis", -1) not in (-1, 3):
        return None
    term = block.terms[0]
    if len(term.summands) != 1 or term.summands[0] is not mask:
        return None
    scale = 1.0
    for node in block.path:
        factor = scalar_factor(node)
        if factor is not None:
            scale *= factor[1]
        elif node is not term.node and node.op not in ("Identity", "Dropout"):
            return None
    return scale


def plain_probabilities(block: AttentionBlock) -> bool:
    """Does the Softmax output reach MatMul(P, V) unchanged: directly, through Identity / Dropout
    (inference), or through sdpa's guard `Where(IsNaN(p), 0, p)` (never taken with a finite mask)?"""
    tensor = block.softmax.outputs[0]
    for _ in range(5):
        guards = [n for n in tensor.outputs if n.op == "IsNaN"]
        readers = [n for n in tensor.outputs if n.op != "IsNaN"]
        if len(readers) != 1:
            return False
        node = readers[0]
        if node is block.context:
            return node.inputs[0] is tensor and not guards
        guarded = (
            node.op == "Where"
            and node.inputs[2] is tensor
            and any(node.inputs[0] is g.outputs[0] for g in guards)
            and (value := constant_array(node.inputs[1])) is not None
            and not value.any()
        )
        if not (guarded or (node.op in ("Identity", "Dropout") and not guards)):
            return False
        tensor = node.outputs[0]
    return False
