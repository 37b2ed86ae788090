"""Sentence-embedding heads after an encoder, found by structure: pooling, L2 normalization, echoes.

A pooling head reduces a per-token activation `[batch, seq, hidden]` over the sequence to one row
per sequence. On a packed batch it would mix the requests of a row, so the packing passes replace
each head with a per-request pooling of the same kind (`PoolingHead.kind`). Recognized, as
torch.onnx (TorchScript and dynamo) writes them for sentence-transformers' `Pooling` module, the
model-card `mean_pooling` function and plain indexing:

- mean: `Div(ReduceSum(Mul(h, m), axis 1), [Clip|Max](ReduceSum(m, axis 1), eps))` where `m` is
  the attention mask through Unsqueeze / Expand (to h's shape) / Cast, in either operand order,
  with Casts anywhere between, ReduceMean in place of both ReduceSums; or an unmasked
  `ReduceMean(h, axis 1)`;
- max: `ReduceMax(Where(Equal(m, 0), fill, h), axis 1)` with a very negative constant `fill`
  (masked_fill), or `Where(m, h, fill)`; or an unmasked `ReduceMax(h, axis 1)`;
- first token (CLS): `Gather(h, 0, axis=1)`, `Slice(h, 0:1, axis 1)`, or sentence-transformers'
  `GatherElements(h, Expand(Unsqueeze(ArgMax(m, axis 1))), axis=1)` (the first real token), each
  optionally followed by `Squeeze(axis 1)` or TorchScript's `If(dim 1 == 1, Squeeze, Identity)`;
- sum over the square root of the count (sentence-transformers' `mean_sqrt_len_tokens`): the masked
  mean with `Sqrt` on the clamped count;
- weighted mean (its `weightedmean`): the masked mean with the mask `m` replaced by `w = m * p`,
  `p` the positions counted from 1 (`Range(1, seq + 1, 1)` through Reshape / Cast, less the first
  real token's index `ArgMax(m, axis 1)` when left padding is allowed for), numerator and count
  both reading `w`;
- last token (its `lasttoken`): `GatherElements(h [* m], seq - w - 1, axis=1)` with `w` the
  position of the last real token counted from the end, `ArgMax` of the mask reversed along the
  sequence (`Slice` with step -1), optionally through the `Where(max == 0, seq - 1, w)` of an
  empty mask; then Squeeze or the If idiom as for the first token.

An unpadded request's own run of any of these is the pooling of its tokens, which is what the
replacement computes. L2 normalization (`F.normalize`: ReduceL2 -> Clip -> Expand -> Div; a Sqrt of
a sum of squares; LpNormalization) acts on each pooled row alone; `L2Normalization.expand` is the
Expand of the norm to the input's shape, whose shape the exporter may compute from the padded
batch size (Div broadcasts without it). Echoes are graph outputs that copy a graph input
through Identity. Matching only: the passes do the rewriting.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite.patterns.attention import constant_array, is_constant, producer
from poprt_lite.patterns.layout import TokenAxes, constant_ints, is_token_major


class PoolKind(str, enum.Enum):
    mean = "mean"
    max = "max"
    first = "first"
    mean_sqrt_len = "mean_sqrt_len"  # the sum over sqrt(number of tokens)
    weighted_mean = "weighted_mean"  # token i (counted from 1) weighted by i
    last = "last"

    def __str__(self) -> str:
        return self.value


# Ops a value passes through unchanged in meaning (dtype changes, copies).
CASTS = ("Cast", "Identity")
# Ops the 0/1 attention mask passes through on its way into a pooling: dtype and broadcast shape.
MASK_PATH = (*CASTS, "Unsqueeze", "Expand", "Reshape")
# Ops a token index passes through on its way into GatherElements.
INDEX_PATH = (*CASTS, "Unsqueeze", "Expand")
# Ops positions and token indices pass through as the exporter shapes them for broadcasting.
POSITION_PATH = (*CASTS, "Reshape", "Unsqueeze", "Squeeze")
MEAN_REDUCTIONS = ("ReduceSum", "ReduceMean")
CLAMPS = ("Clip", "Max")  # torch.clamp(min=eps)
# A masked_fill value at or below this is "minus infinity" for a maximum.
FILL_AT_MOST = -1e4
SEQUENCE_AXIS = 1


@dataclass
class PoolingHead:
    kind: PoolKind
    hidden: gs.Tensor  # the per-token activation [batch, seq, hidden] it pools
    output: gs.Tensor  # [batch, hidden], or [batch, 1, hidden] when keepdims
    keepdims: bool
    masked: bool  # reads the attention mask (else pools all tokens, as an unpadded request does)
    nodes: list[gs.Node] = field(default_factory=list)  # the nodes it replaces, from the anchor on

    @property
    def name(self) -> str:
        return self.nodes[0].name


@dataclass
class L2Normalization:
    input: gs.Tensor
    output: gs.Tensor
    expand: gs.Node | None  # Expand(norm, shape) feeding the Div; None if there is none


# ------------------------------------------------------------------------------ small matchers


def origin(tensor: gs.Tensor, through: Iterable[str]) -> gs.Tensor:
    """Walk back from `tensor` through ops in `through` (their first input) to the first other one."""
    through = tuple(through)
    while (node := producer(tensor, through)) is not None:
        tensor = node.inputs[0]
    return tensor


def _rank(tensor: gs.Tensor, default: int) -> int:
    return len(tensor.shape) if tensor.shape is not None else default


def reduce_axes(node: gs.Node, rank: int) -> list[int] | None:
    """The normalized axes of a Reduce* node (attribute or constant input), None if unknown."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_ints(node.inputs[1])
    if axes is None:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


def _keepdims(node: gs.Node) -> bool:
    return bool(node.attrs.get("keepdims", 1))


def _scalar(tensor: gs.Tensor) -> float | None:
    """The value of a constant holding one number (any shape of size 1)."""
    values = constant_array(tensor)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


# --------------------------------------------------------------------------------- the patterns


class _Matcher:
    def __init__(self, graph: gs.Graph, mask: gs.Tensor | None, dims: TokenAxes) -> None:
        self.graph = graph
        self.mask = mask
        self.dims = dims

    def hidden(self, tensor: gs.Tensor) -> gs.Tensor | None:
        """`tensor` (through Casts) if it is a per-token float activation [batch, seq, hidden]."""
        tensor = origin(tensor, CASTS)
        ok = is_token_major(tensor, self.dims) and self.dims.rank(tensor) == 3 and _is_float(tensor)
        return tensor if ok and not self.is_mask(tensor) else None

    def is_mask(self, tensor: gs.Tensor) -> bool:
        return self.mask is not None and origin(tensor, MASK_PATH) is self.mask

    def over_sequence(self, node: gs.Node | None, ops: Iterable[str]) -> bool:
        """A Reduce* node of `ops` over exactly the sequence axis of a rank-3 input."""
        return node is not None and node.op in tuple(ops) and reduce_axes(node, _rank(node.inputs[0], 3)) == [SEQUENCE_AXIS]

    # mean ---------------------------------------------------------------------------------------

    def masked_mean(self, div: gs.Node) -> PoolingHead | None:
        """mean, mean_sqrt_len and weighted_mean: `sum(h * w, 1) / [Sqrt](clamp(sum(w, 1)))` with
        `w` the mask (or the mask times the positions from 1)."""
        numerator = producer(origin(div.inputs[0], CASTS))
        if not self.over_sequence(numerator, MEAN_REDUCTIONS):
            return None
        mul = producer(origin(numerator.inputs[0], CASTS), ("Mul",))
        if mul is None:
            return None
        hidden = kind = None
        for a, b in (mul.inputs, mul.inputs[::-1]):
            if (hidden := self.hidden(a)) is None:
                continue
            if self.is_mask(b):
                kind = PoolKind.mean
            elif self.is_position_weights(b):
                kind = PoolKind.weighted_mean
            if kind is not None:
                weights = origin(b, CASTS)
                break
        if kind is None:
            return None
        count = origin(div.inputs[1], CASTS)
        root = producer(count, ("Sqrt",))
        if root is not None and kind is PoolKind.mean:
            kind, count = PoolKind.mean_sqrt_len, origin(root.inputs[0], CASTS)
        clamp = producer(count, CLAMPS)
        if clamp is not None:
            bound = _scalar(clamp.inputs[1]) if len(clamp.inputs) > 1 and clamp.inputs[1].name else None
            if bound is None or not 0 <= bound <= 1:
                return None
            count = origin(clamp.inputs[0], CASTS)
        denominator = producer(count)
        if not self.over_sequence(denominator, (numerator.op,)):
            return None
        counted = denominator.inputs[0]
        if not (self.is_mask(counted) if kind is not PoolKind.weighted_mean else origin(counted, CASTS) is weights):
            return None
        return PoolingHead(kind, hidden, div.outputs[0], _keepdims(numerator), True, [div, numerator, mul, denominator])

    def is_position_weights(self, tensor: gs.Tensor) -> bool:
        """`m * p`: the mask times the positions from 1 (see the module docstring)."""
        mul = producer(origin(tensor, CASTS), ("Mul",))
        return mul is not None and any(self.is_mask(a) and self.is_positions_from_one(b) for a, b in (mul.inputs, mul.inputs[::-1]))

    def is_positions_from_one(self, tensor: gs.Tensor) -> bool:
        tensor = origin(tensor, POSITION_PATH)
        shift = producer(tensor, ("Sub",))
        if shift is not None:
            if not self.is_first_real_index(shift.inputs[1]):
                return False
            tensor = origin(shift.inputs[0], POSITION_PATH)
        positions = producer(tensor, ("Range",))
        return positions is not None and _scalar(positions.inputs[0]) == 1 and _scalar(positions.inputs[2]) == 1

    def is_first_real_index(self, tensor: gs.Tensor) -> bool:
        """ArgMax(mask, axis 1): the first real token of each sequence (0 unless left-padded)."""
        argmax = producer(origin(tensor, POSITION_PATH), ("ArgMax",))
        return (
            argmax is not None and argmax.attrs.get("axis", 0) == SEQUENCE_AXIS
            and not argmax.attrs.get("select_last_index", 0) and self.is_mask(argmax.inputs[0])
        )

    def is_last_real_index(self, tensor: gs.Tensor) -> bool:
        """`seq - w - 1` with `w` the ArgMax of the reversed mask (see the module docstring)."""
        outer = producer(origin(tensor, POSITION_PATH), ("Sub",))
        if outer is None or _scalar(outer.inputs[1]) != 1:
            return False
        inner = producer(origin(outer.inputs[0], POSITION_PATH), ("Sub",))
        if inner is None:
            return False
        from_end = origin(inner.inputs[1], POSITION_PATH)
        empty = producer(from_end, ("Where",))
        if empty is not None:
            from_end = origin(empty.inputs[2], POSITION_PATH)
        argmax = producer(from_end, ("ArgMax",))
        if argmax is None or argmax.attrs.get("axis", 0) != SEQUENCE_AXIS or argmax.attrs.get("select_last_index", 0):
            return False
        flip = producer(origin(argmax.inputs[0], CASTS), ("Slice",))
        if flip is None or not self.is_mask(flip.inputs[0]) or len(flip.inputs) < 5:
            return False
        starts, ends, axes, steps = (constant_ints(t) for t in flip.inputs[1:5])
        return starts == [-1] and steps == [-1] and axes in ([1], [-1]) and ends is not None and ends[0] <= -_rank(self.mask, 2) - 1

    def plain(self, node: gs.Node, ops: tuple[str, ...], kind: PoolKind) -> PoolingHead | None:
        if not self.over_sequence(node, ops) or (hidden := self.hidden(node.inputs[0])) is None:
            return None
        return PoolingHead(kind, hidden, node.outputs[0], _keepdims(node), False, [node])

    # max ----------------------------------------------------------------------------------------

    def masked_max(self, node: gs.Node) -> PoolingHead | None:
        if not self.over_sequence(node, ("ReduceMax",)):
            return None
        where = producer(origin(node.inputs[0], CASTS), ("Where",))
        if where is None:
            return None
        condition, when_true, when_false = where.inputs
        fill_true, fill_false = _scalar(when_true), _scalar(when_false)
        hidden = None
        if fill_true is not None and fill_true <= FILL_AT_MOST and self.is_padding(condition):
            hidden = self.hidden(when_false)  # masked_fill(mask == 0, -inf)
        elif fill_false is not None and fill_false <= FILL_AT_MOST and self.is_mask(condition):
            hidden = self.hidden(when_true)  # where(mask, h, -inf)
        if hidden is None:
            return None
        return PoolingHead(PoolKind.max, hidden, node.outputs[0], _keepdims(node), True, [node, where])

    def is_padding(self, tensor: gs.Tensor) -> bool:
        """True on padding: Equal(mask, 0) or Not(mask), through Casts."""
        node = producer(origin(tensor, CASTS), ("Equal", "Not"))
        if node is None:
            return False
        if node.op == "Not":
            return self.is_mask(node.inputs[0])
        return any(self.is_mask(a) and _scalar(b) == 0 for a, b in (node.inputs, node.inputs[::-1]))

    # first token --------------------------------------------------------------------------------

    def first_token(self, node: gs.Node) -> PoolingHead | None:
        """first (CLS) and last: one token selected along the sequence."""
        data = node.inputs[0] if node.inputs else None
        if data is None:
            return None
        kind = PoolKind.first
        if node.op == "GatherElements":
            if node.attrs.get("axis", 0) not in (1, -2):
                return None
            index = origin(node.inputs[1], INDEX_PATH)
            if self.is_last_real_index(index):
                kind = PoolKind.last
            elif not self.is_first_real_index(index):
                return None
            keepdims, masked = True, True
            hidden = self.hidden(self.unmasked(data))  # a real token times the mask is itself
        else:
            hidden, masked = self.hidden(data), False
            if node.op == "Gather":
                axis = node.attrs.get("axis", 0)
                index = constant_ints(node.inputs[1])
                if axis not in (1, -2) or index != [0]:
                    return None
                keepdims = node.inputs[1].shape is not None and len(node.inputs[1].shape) == 1
            elif node.op == "Slice":
                bounds = [constant_ints(t) if t.name else None for t in node.inputs[1:]] + [None] * (5 - len(node.inputs))
                starts, ends, axes, steps = bounds[:4]
                if starts != [0] or ends != [1] or axes not in ([1], [-2]) or steps not in (None, [1]):
                    return None
                keepdims = True
            else:
                return None
        if hidden is None:
            return None
        head = PoolingHead(kind, hidden, node.outputs[0], keepdims, masked, [node])
        if keepdims:
            squeeze = self.squeeze_of(node.outputs[0])
            if squeeze is not None:
                head.output, head.keepdims = squeeze.outputs[0], False
                head.nodes.append(squeeze)
        return head

    def unmasked(self, tensor: gs.Tensor) -> gs.Tensor:
        """`h` if `tensor` is `h * mask` (through Casts), else `tensor`."""
        mul = producer(origin(tensor, CASTS), ("Mul",))
        if mul is not None:
            for a, b in (mul.inputs, mul.inputs[::-1]):
                if self.is_mask(b) and self.hidden(a) is not None:
                    return a
        return tensor

    def squeeze_of(self, tensor: gs.Tensor) -> gs.Node | None:
        """What removes axis 1 of `tensor`, if that is all that reads it (besides Shape): a Squeeze,
        or TorchScript's If idiom (whose branches read `tensor` from the enclosing graph)."""
        readers = [n for n in tensor.outputs if n.op != "Shape"]
        if len(readers) == 1 and readers[0].op == "Squeeze":
            node = readers[0]
            axes = node.attrs.get("axes") or (constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None)
            return node if axes in ([1], [-2]) else None
        for node in self.graph.nodes:
            if node.op != "If":
                continue
            branches = [node.attrs.get("then_branch"), node.attrs.get("else_branch")]
            if sorted(_branch_kind(b, tensor) for b in branches) != ["copy", "squeeze"]:
                continue
            inside = {id(n) for b in branches for n in b.nodes}
            return node if all(id(n) in inside for n in readers) else None
        return None


def _branch_kind(branch, tensor: gs.Tensor) -> str:
    """'squeeze' if the If branch squeezes axis 1 of the outer `tensor`, 'copy' if it returns it."""
    if not isinstance(branch, gs.Graph) or len(branch.outputs) != 1:
        return "other"
    node = producer(branch.outputs[0])
    if node is None or not node.inputs or node.inputs[0].name != tensor.name:
        return "other"
    if node.op == "Identity":
        return "copy"
    if node.op == "Squeeze":
        axes = node.attrs.get("axes") or (constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None)
        return "squeeze" if axes in ([1], [-2]) else "other"
    return "other"


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)


def find_pooling_heads(graph: gs.Graph, mask: gs.Tensor | None, dims: TokenAxes, nodes: Iterable[gs.Node] | None = None) -> list[PoolingHead]:
    """The pooling heads among `nodes` (default: the whole graph) over activations led by the
    token axes `dims`, reading the attention-mask input `mask` if masked."""
    matcher = _Matcher(graph, mask, dims)
    nodes = list(graph.nodes if nodes is None else nodes)
    heads: list[PoolingHead] = []
    claimed: set[int] = set()

    def add(head: PoolingHead | None) -> None:
        # a head's other nodes may be another's too (mean and mean_sqrt_len share their sum)
        if head is not None and id(head.nodes[0]) not in claimed:
            heads.append(head)
            claimed.update(id(n) for n in head.nodes)

    for node in nodes:  # masked forms first: their reductions must not match as unmasked ones
        if node.op == "Div":
            add(matcher.masked_mean(node))
        elif node.op == "ReduceMax":
            add(matcher.masked_max(node))
        elif node.op in ("Gather", "Slice", "GatherElements"):
            add(matcher.first_token(node))
    for node in nodes:
        if id(node) not in claimed and node.op in ("ReduceMean", "ReduceMax"):
            add(matcher.plain(node, (node.op,), PoolKind.mean if node.op == "ReduceMean" else PoolKind.max))
    return heads


def find_l2_normalizations(graph: gs.Graph, nodes: Iterable[gs.Node] | None = None) -> list[L2Normalization]:
    """x / ||x||_2 over the last axis: Div(x, [Expand](Clip|Max(norm(x), eps) | norm(x))) with
    norm = ReduceL2 or Sqrt(ReduceSum(x*x | x^2)) or Sqrt(ReduceSumSquare), keepdims; or
    LpNormalization(p=2) over the last axis."""
    found = []
    for node in graph.nodes if nodes is None else nodes:
        if node.op == "LpNormalization":
            rank = _rank(node.inputs[0], 2)
            axis = node.attrs.get("axis", -1)
            if node.attrs.get("p", 2) == 2 and axis % rank == rank - 1:
                found.append(L2Normalization(node.inputs[0], node.outputs[0], None))
        elif node.op == "Div":
            x = node.inputs[0]
            expand = producer(node.inputs[1], ("Expand",))
            norm = expand.inputs[0] if expand is not None else node.inputs[1]
            clamp = producer(norm, CLAMPS)
            if clamp is not None and len(clamp.inputs) > 1 and clamp.inputs[1].name and is_constant(clamp.inputs[1]):
                norm = clamp.inputs[0]
            if _is_norm_of(norm, x):
                found.append(L2Normalization(x, node.outputs[0], expand))
    return found


def _is_norm_of(norm: gs.Tensor, x: gs.Tensor) -> bool:
    def over_last(node: gs.Node | None, ops: tuple[str, ...]) -> bool:
        if node is None or node.op not in ops or not _keepdims(node):
            return False
        rank = _rank(node.inputs[0], 2)
        return reduce_axes(node, rank) == [rank - 1]

    node = producer(norm)
    if over_last(node, ("ReduceL2",)):
        return node.inputs[0] is x
    root = producer(norm, ("Sqrt",))
    if root is None:
        return False
    total = producer(root.inputs[0])
    if over_last(total, ("ReduceSumSquare",)):
        return total.inputs[0] is x
    if not over_last(total, ("ReduceSum",)):
        return False
    square = producer(total.inputs[0], ("Mul", "Pow"))
    if square is None:
        return False
    if square.op == "Mul":
        return square.inputs[0] is x and square.inputs[1] is x
    return square.inputs[0] is x and _scalar(square.inputs[1]) == 2


def find_echoes(graph: gs.Graph) -> list[tuple[gs.Tensor, gs.Tensor]]:
    """(graph output, graph input) pairs where the output copies the input through Identity."""
    inputs = {id(t) for t in graph.inputs}
    echoes = []
    for output in graph.outputs:
        source = origin(output, ("Identity",))
        if source is not output and id(source) in inputs:
            echoes.append((output, source))
    return echoes
