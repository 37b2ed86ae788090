"""Rotary position embeddings: the positions a model's rotary angles are computed from.

Rotary encoders (ModernBERT, RoFormer, nomic-embed, ...) have no position table added to the word
embeddings; they rotate Q and K by angles `positions * inv_freq`. Exported without a `position_ids`
input, the positions are `Range(0, seq)`. Packed rows need them to restart at each request, so
`passes/export_position_ids.py` feeds a `position_ids` input to the readers of those positions.
Two forms, found by structure:

* angles computed in the graph (ModernBERT): every Cos / Sin whose input reads no activations is
  computed from one `Range(0, seq, 1)`; the positions are that Range unsqueezed on axis 0
  (`[1, seq]`, `arange(seq).unsqueeze(0)`), and position ids `[batch, seq]` broadcast the same way;
* a sin / cos table (RoFormer's sinusoidal positions): a Gather from a constant `[positions, d]`
  table by `Range(0, seq, 1)` whose rows multiply the activations (Q and K, through views such as
  the chunk into sin and cos and their interleaving), not added to the embeddings; the looked-up
  `[seq, d]` is put before the heads as `[1, ..., 1, seq, d]` by Unsqueezes (`broadcast`), which
  position ids `[batch, seq]` need as `[batch, 1, ..., seq, d]`; the dynamo export also reshapes
  those rows to a constant shape `[1, 1, -1, d]` (`pinned`), which then keeps the batch instead.

`unrecognized_rotary` says what stops a graph whose Cos / Sin angles are not of the activations from
matching, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite.patterns.attention import constant_array, producer

ANGLE_OPS = ("Cos", "Sin")


# the ops between a sin / cos table lookup and the Mul by Q or K: views of the looked-up rows
TABLE_VIEWS = ("Unsqueeze", "Squeeze", "Reshape", "Slice", "Split", "Concat", "Expand", "Transpose", "Cast", "Identity", "Tile")


@dataclass
class RotaryPositions:
    positions: gs.Tensor  # the positions the angles are computed from: [1, seq] (angles), [seq] (table)
    readers: list[gs.Node]  # the nodes that read `positions` on the way to the angles
    angles: list[gs.Node]  # the Cos / Sin nodes, or the table lookups (Gather)
    broadcast: list[list[gs.Node]]  # table form, per lookup: the Unsqueezes making its [seq, d] [1, ..., 1, seq, d]
    pinned: list[gs.Node]  # table form: Reshapes of the looked-up rows whose constant shape has batch 1


def find_rotary_positions(graph: gs.Graph, content: set[int]) -> RotaryPositions | None:
    """The rotary positions of `graph`, or None if it has no such angles (`content`: ids of the
    activations, `attention.token_content`)."""
    found = _match_angles(graph, content) or _match_table(graph, content)
    return found if isinstance(found, RotaryPositions) else None


def unrecognized_rotary(graph: gs.Graph, content: set[int]) -> str | None:
    """What stops rotary angles of positions (Cos / Sin not of the activations, or a table lookup
    multiplying them) from matching either form, naming the node; None if there are none or they
    match."""
    found = _match_angles(graph, content) or _match_table(graph, content)
    return found if isinstance(found, str) else None


def _match_angles(graph: gs.Graph, content: set[int]) -> RotaryPositions | str | None:
    """The angles form; None without Cos / Sin of positions; a sentence saying what does not match."""
    angles = [n for n in graph.nodes if n.op in ANGLE_OPS]
    angles = [n for n in angles if not any(id(t) in content for m in _cone(n.inputs[0]) if m.op != "Shape" for t in m.inputs)]
    if not angles:
        return None  # no angles, or angles of the activations: not positions
    ranges: dict[int, gs.Node] = {}
    for node in angles:
        found = [n for n in _cone(node.inputs[0]) if n.op == "Range"]
        if not found:
            return f"the rotary angles of {node.op} node '{node.name}' are not computed from a Range of positions"
        if len(found) > 1:
            names = ", ".join(f"'{n.name}'" for n in found)
            return f"the rotary angles of {node.op} node '{node.name}' are computed from several Ranges ({names})"
        if not _counts_from_zero(found[0]):
            return f"the rotary angles of {node.op} node '{node.name}' are computed from Range node '{found[0].name}', which does not count 0, 1, 2, ..."
        ranges[id(found[0])] = found[0]
    if len(ranges) != 1:
        names = ", ".join(f"'{n.name}'" for n in ranges.values())
        return f"the rotary angles of {angles[0].op} node '{angles[0].name}' and others are computed from different Ranges ({names})"
    (arange,) = ranges.values()
    rows = [n for n in arange.outputs[0].outputs if n.op == "Unsqueeze" and unsqueeze_axes(n) == [0]]
    if len(rows) != 1:
        return f"the positions of the rotary angles of {angles[0].op} node '{angles[0].name}', Range node '{arange.name}', are not made a row [1, seq] by one Unsqueeze on axis 0"
    positions = rows[0].outputs[0]
    upstream = {id(n) for node in angles for n in _cone(node.inputs[0], through_sizes=True)}
    readers = [n for n in positions.outputs if id(n) in upstream]
    if not readers:
        return f"the position row of Range node '{arange.name}' does not reach the rotary angles of {angles[0].op} node '{angles[0].name}'"
    return RotaryPositions(positions, readers, angles, [], [])


def _match_table(graph: gs.Graph, content: set[int]) -> RotaryPositions | str | None:
    """The table form: Gathers from a constant [positions, d] table by one Range(0, seq) whose rows
    multiply the activations, each put before the heads by Unsqueezes only; None without such
    lookups; a sentence saying what does not match."""
    lookups = [
        n for n in graph.nodes
        if n.op == "Gather" and n.attrs.get("axis", 0) == 0 and constant_array(n.inputs[0]) is not None
        and len(n.inputs[0].shape or ()) == 2 and id(n.inputs[1]) not in content
        and _views_to_activations(n.outputs[0], content) is not None
    ]  # fmt: skip
    if not lookups:
        return None
    ranges: dict[int, gs.Node] = {}
    for lookup in lookups:
        arange = producer(lookup.inputs[1], ["Range"])
        if arange is None:
            return f"the rotary table lookup Gather node '{lookup.name}' reads '{lookup.inputs[1].name}', not positions of a Range"
        if not _counts_from_zero(arange):
            return f"the rotary table lookup Gather node '{lookup.name}' reads Range node '{arange.name}', which does not count 0, 1, 2, ..."
        ranges[id(arange)] = arange
    if len(ranges) != 1:
        names = ", ".join(f"'{n.name}'" for n in ranges.values())
        return f"the rotary table lookups (Gather node '{lookups[0].name}' and others) read different Ranges ({names})"
    broadcast, pinned = [], []
    for lookup in lookups:
        chain = _leading_unsqueezes(lookup.outputs[0])
        if chain is None:
            return f"the rows of the rotary table lookup Gather node '{lookup.name}' are not put before the heads by Unsqueezes of leading axes only"
        broadcast.append(chain)
        pinned += _batch_of_one(_views_to_activations(lookup.outputs[0], content))
    return RotaryPositions(lookups[0].inputs[1], lookups, lookups, broadcast, pinned)


def _views_to_activations(tensor: gs.Tensor, content: set[int]) -> list[gs.Node] | None:
    """The views `tensor`'s values go through to a Mul with activations (sin / cos by Q, K), or
    None if they reach none."""
    views, seen, stack, multiplied = [], set(), [tensor], False
    while stack:
        for node in stack.pop().outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Mul" and any(id(t) in content for t in node.inputs):
                multiplied = True
            elif node.op in TABLE_VIEWS:
                views.append(node)
                stack.extend(node.outputs)
    return views if multiplied else None


def _batch_of_one(views: list[gs.Node]) -> list[gs.Node]:
    """The Reshapes among `views` whose constant shape says batch 1 (dynamo bakes the [1, 1, seq, d]
    of the lookup into the shape of its views)."""
    pinned = []
    for node in views:
        shape = constant_array(node.inputs[1]) if node.op == "Reshape" else None
        if shape is not None and shape.ndim == 1 and shape.size and int(shape[0]) == 1:
            pinned.append(node)
    return pinned


def _leading_unsqueezes(tensor: gs.Tensor) -> list[gs.Node] | None:
    """The Unsqueezes, one reading the other, that add two or more leading axes (batch and heads)
    to `tensor` (its only readers until the last), or None if it is used otherwise."""
    chain, leading = [], 0
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Unsqueeze":
        node = tensor.outputs[0]
        axes = unsqueeze_axes(node)
        leading += len(axes or ())
        if not axes or min(axes) < 0 or max(axes) >= leading:
            return None
        chain.append(node)
        tensor = node.outputs[0]
    return chain if leading >= 2 else None


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


def unsqueeze_axes(node: gs.Node) -> list[int] | None:
    """The axes of an Unsqueeze (its input from opset 13, its attribute before), None if not constant."""
    if len(node.inputs) > 1:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else list(axes)
