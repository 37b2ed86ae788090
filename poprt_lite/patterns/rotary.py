"""Rotary position embeddings: the positions a model's rotary angles are computed from.

Rotary encoders (ModernBERT, RoFormer-style Llama attention, nomic-embed, ...) have no position
table added to the word embeddings; they rotate Q and K by angles `positions * inv_freq`, through
`Cos` and `Sin`. Exported without a `position_ids` input, the positions are `Range(0, seq)` made a
row `[1, seq]` (`arange(seq).unsqueeze(0)`, what transformers does when no position ids are given).
Packed rows need them to restart at each request, so `passes/export_position_ids.py` feeds a
`position_ids` input to every reader of that row on the way to the angles.

Found by structure: every Cos / Sin whose input reads no activations and is computed from one
`Range(0, seq, 1)`; the positions are that Range unsqueezed on axis 0 (`[1, seq]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite.patterns.attention import constant_array, producer

ANGLE_OPS = ("Cos", "Sin")


@dataclass
class RotaryPositions:
    positions: gs.Tensor  # [1, seq]: the position ids the angles are computed from
    readers: list[gs.Node]  # the nodes that read `positions` on the way to the angles
    angles: list[gs.Node]  # the Cos / Sin nodes


def find_rotary_positions(graph: gs.Graph, content: set[int]) -> RotaryPositions | None:
    """The rotary position row of `graph`, or None if it has no such angles (`content`: ids of
    the activations, `attention.token_content`)."""
    angles = [n for n in graph.nodes if n.op in ANGLE_OPS]
    ranges: dict[int, gs.Node] = {}
    for node in angles:
        cone = _cone(node.inputs[0])
        if any(id(t) in content for n in cone if n.op != "Shape" for t in n.inputs):
            return None  # angles of the activations: not positions
        found = [n for n in cone if n.op == "Range"]
        if len(found) != 1 or not _counts_from_zero(found[0]):
            return None
        ranges[id(found[0])] = found[0]
    if len(ranges) != 1:
        return None
    (arange,) = ranges.values()
    rows = [n for n in arange.outputs[0].outputs if n.op == "Unsqueeze" and _axes(n) == [0]]
    if len(rows) != 1:
        return None
    positions = rows[0].outputs[0]
    upstream = {id(n) for node in angles for n in _cone(node.inputs[0], through_sizes=True)}
    readers = [n for n in positions.outputs if id(n) in upstream]
    return RotaryPositions(positions, readers, angles) if readers else None


def _cone(tensor: gs.Tensor, through_sizes: bool = False) -> list[gs.Node]:
    """The nodes `tensor` is computed from (by value; with `through_sizes`, through Shape too)."""
    nodes, seen, stack = [], set(), [tensor]
    while stack:
        node = producer(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        if node.op != "Shape" or through_sizes:
            stack.extend(node.inputs)
    return nodes


def _counts_from_zero(node: gs.Node) -> bool:
    start, _, step = (constant_array(t) for t in node.inputs)
    return start is not None and step is not None and float(start) == 0 and float(step) == 1


def _axes(node: gs.Node) -> list[int] | None:
    if len(node.inputs) > 1:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else list(axes)
