"""Which attention-mask terms are the padding mask alone, proven by evaluating them.

A packing pass masks attention with a mask of its own (the block-diagonal AttentionMask, or a
PaddingMask on per-request rows) in place of the exporter's padding mask. Dropping a score term
that carries more than the padding mask (a sliding-window band, a causal mask, a table of
per-position values combined with it) would leave a model that answers plausibly and wrongly, so a
term is dropped only when it is proven to be the padding mask and nothing else. Exporters spell
masks in many ways (`(1 - m) * min`, masked_fill, sdpa's boolean masks gathered by index), so the
proof is by value, not by op names.

A term that reads no activations is a function of the padding-mask input and the sequence length
only. `prove_padding_masks` evaluates every such term (onnx's reference evaluator, on the term's own cone; the
Shape nodes in it get the sizes shape inference gives for the probe) on right-padded masks of many
request lengths, at the longest length the packed model serves and at a shorter one. A summand is
the padding mask when, for every real query, it is one value on the request's keys and at least
1000 below it (or -inf) on its padding keys; a Where condition, when it keeps the request's keys and
drops its padding keys (and its fill is at most -1000). Those become `ScoreTerm.masks` and
`AttentionBlock.padding_wheres`, the only terms `apply_mask` drops.

`shift_invariant` serves attention_mask mode, which keeps the other terms on the packed row:
a term must give the tokens of a request placed anywhere in a row the values it gives them when the
request starts the row, which holds for bands and causal masks built from position differences and
fails for tables indexed by absolute position.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

from poprt_lite.errors import PoprtError
from poprt_lite.patterns.attention import AttentionBlock, constant_array, is_constant, producer
from poprt_lite.patterns.layout import probe_shapes

MASKED_BELOW = 1000.0  # a masked score is at least this far below the kept ones: exp(-1000) is 0
SIZE_OPS = ("Shape", "Size")


def probe_lengths(longest: int) -> list[int]:
    """Request lengths to evaluate masks on: short ones, Fibonacci steps, the longest and its neighbours."""
    lengths, a, b = {1, 2, 3, longest // 2, longest - 2, longest - 1, longest}, 5, 8
    while a < longest:
        lengths.add(a)
        a, b = b, a + b
    return sorted(n for n in lengths if 1 <= n <= longest)


def prove_padding_masks(graph: gs.Graph, blocks: list[AttentionBlock], mask: gs.Variable | None, dims: tuple, longest: int, content: set[int]) -> None:
    """Mark the blocks' mask-reading summands and Where conditions that are the padding mask alone
    (see the module docstring), evaluated at sequence lengths `longest` and about half of it.
    `dims`: the token input's declared [batch, seq]; `content`: ids of the activations."""
    summands = [t for block in blocks for term in block.terms for t in term.mask_readers]
    wheres = [node for block in blocks for node in block.where_masks if _fill_masks(node)]
    candidates = [t for t in [*summands, *(n.inputs[0] for n in wheres)] if not reads_content(t, content)]
    if mask is None or not candidates:
        return
    proven = {id(t) for t in candidates}
    for seq in sorted({longest, longest // 2 + 1}):
        lengths = probe_lengths(seq)
        values = evaluate(graph, candidates, mask, _prefix_masks(lengths, seq, mask.dtype), dims, content)
        if values is None:
            return  # cannot evaluate: nothing is proven, nothing is dropped
        for tensor, value in zip(candidates, values, strict=True):
            grid = _grid(value, len(lengths), seq)
            if grid is None or not _masks_padding(grid, lengths):
                proven.discard(id(tensor))
    for block in blocks:
        for term in block.terms:
            term.masks = [t for t in term.mask_readers if id(t) in proven]
        block.padding_wheres = [n for n in block.where_masks if id(n.inputs[0]) in proven]


def shift_invariant(graph: gs.Graph, tensor: gs.Tensor, mask: gs.Variable | None, dims: tuple, row: int, content: set[int]) -> bool | None:
    """Does `tensor` (a score term or Where condition that reads no activations) give the tokens of a
    request anywhere in a row of length `row` the values it gives them when the request starts the
    row? None when it cannot be evaluated."""
    lengths = probe_lengths(row)
    values = None if mask is None else evaluate(graph, [tensor], mask, _prefix_masks(lengths, row, mask.dtype), dims, content)
    grid = None if values is None else _grid(values[0], len(lengths), row)
    return None if grid is None else _same_at_every_offset(grid, lengths)


def reads_content(tensor: gs.Tensor, content: set[int]) -> bool:
    """Does `tensor` depend on the activations by value (not only through their shapes)?"""
    return any(id(t) in content for t in _value_cone(tensor)[1])


def describe(tensor: gs.Tensor, content: set[int]) -> str:
    """What a mask term is made of, for messages (the padding mask aside)."""
    nodes, tensors = _value_cone(tensor)
    ops = {n.op for n in nodes}
    if any(id(t) in content for t in tensors):
        return "values computed from the activations"
    if "Trilu" in ops:
        return "a causal (triangular) mask"
    if "Range" in ops and "Abs" in ops:
        return "a sliding-window band built from position differences"
    if "Range" in ops and "Sub" in ops:
        return "a band built from position differences"
    if "Range" in ops and ops & {"Less", "LessOrEqual", "Greater", "GreaterOrEqual"}:
        return "a causal mask comparing positions"
    tables = [t for t in tensors if (v := constant_array(t)) is not None and v.ndim >= 2 and v.size > 1 and np.ptp(v.astype(np.float64)) > 0]
    if tables:
        return f"a constant table of per-position values ('{tables[0].name}', {list(tables[0].shape)})"
    return "terms other than the padding mask"


# ----------------------------------------------------------------------------- evaluation


def evaluate(graph: gs.Graph, tensors: list[gs.Tensor], mask: gs.Variable, masks: np.ndarray, dims: tuple, content: set[int]) -> list[np.ndarray] | None:
    """`tensors` (functions of `mask` and the sequence length) computed for the padding masks
    `masks` [B, S], or None when they read another input by value or cannot be evaluated. The
    sizes of the activations (`content`) and of other inputs, which a Shape node may read, come from
    shape inference for the probe; sizes of what the cone computes itself are computed."""
    copy = graph.copy()
    by_name = copy.tensors()
    targets = [by_name[t.name] for t in tensors]
    names = {id(t): t.name for t in graph.tensors().values()}
    outside = {names[i] for i in content if i in names} | {t.name for t in copy.inputs if t.name != mask.name}
    nodes, reached = set(), []
    for target in targets:
        cone_nodes, cone_tensors = _value_cone(target, lambda t: t.name not in outside)
        nodes |= {id(n) for n in cone_nodes}
        reached += cone_tensors
    inputs = {t.name for t in copy.inputs}
    if any(t.name in inputs and t.name != mask.name for t in reached):
        return None
    shapes: dict[str, tuple] = {}
    for node in [n for n in copy.nodes if id(n) in nodes and n.op in SIZE_OPS and n.inputs[0].name in outside]:
        source = node.inputs[0]
        shape = _probe_shape(graph, source, dims, masks.shape, shapes)
        if shape is None or None in shape:
            return None
        value = np.asarray(shape, np.int64)
        if node.op == "Size":
            value = np.asarray(value.prod(), np.int64)
        else:
            value = value[node.attrs.get("start", 0) : node.attrs.get("end", len(shape))]
        node.op, node.domain, node.attrs, node.inputs = "Constant", "", {"value": gs.Constant(f"{node.outputs[0].name}_probe", value)}, []
    feed = by_name[mask.name]
    feed.shape = list(masks.shape)
    copy.inputs = [feed]
    copy.outputs = targets
    try:
        copy.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(copy, do_type_check=False)
        del model.graph.value_info[:]
        names = [o.name for o in model.graph.output]
        del model.graph.output[:]  # exporters leave the types of intermediates to inference
        inferred = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(name, inferred.get(name, 0), None) for name in names)
        with np.errstate(all="ignore"):  # masks of finfo.min overflow on the way, as in the model
            return ReferenceEvaluator(model).run(None, {mask.name: masks})
    except Exception:  # an op the reference evaluator lacks (a contrib op), a size inference missed: unproven
        return None


def _probe_shape(graph: gs.Graph, tensor: gs.Tensor, dims: tuple, probe: tuple[int, int], shapes: dict[str, tuple]) -> tuple | None:
    """`tensor`'s shape in the probe: a graph input leading with the token dims directly, any other
    tensor by shape inference (`probe_shapes`, run once per probe into `shapes`)."""
    if tensor.name in {t.name for t in graph.inputs} and tensor.shape is not None and tuple(tensor.shape[:2]) == dims:
        return (*probe, *tensor.shape[2:])
    if not shapes:
        shapes.update(probe_shapes(graph, dims, probe))
    return shapes.get(tensor.name)


def _value_cone(tensor: gs.Tensor, sizes_through=lambda t: False) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """The nodes and tensors `tensor` is computed from by value: Shape and Size read their input
    for its size only, so the walk stops there, but for inputs `sizes_through(input)` accepts."""
    nodes, tensors, seen, stack = [], [], set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        tensors.append(t)
        node = producer(t)
        if node is None:
            continue
        nodes.append(node)
        if node.op not in SIZE_OPS or sizes_through(node.inputs[0]):
            stack.extend(i for i in node.inputs if i.name)
    return nodes, tensors


def _prefix_masks(lengths: list[int], seq: int, dtype) -> np.ndarray:
    masks = np.zeros((len(lengths), seq), dtype=np.dtype(dtype) if dtype is not None else np.int64)
    for row, n in enumerate(lengths):
        masks[row, :n] = 1
    return masks


def _grid(value: np.ndarray, batch: int, seq: int) -> np.ndarray | None:
    """`value` (a term or condition evaluated for `batch` masks of length `seq`) as [batch, heads,
    queries, seq] with queries 1 or seq; None if it is not laid out as attention scores."""
    value = np.asarray(value)
    if value.ndim == 2 and value.shape[-1] == seq:
        value = value[None, None]
    elif value.ndim == 3 and value.shape[-1] == seq:
        first = value.shape[0]
        if first == 1:
            value = value[None]  # broadcast against the heads axis
        elif first % batch == 0:
            value = value.reshape(batch, first // batch, *value.shape[1:])  # [batch*heads, q, S]
        else:
            return None
    if value.ndim != 4 or value.shape[-1] != seq or value.shape[-2] not in (1, seq) or value.shape[0] not in (1, batch):
        return None
    return np.broadcast_to(value, (batch, *value.shape[1:]))


def _fill_masks(node: gs.Node) -> bool:
    """Is the constant branch of `Where(cond, scores, fill)` a masking value (<= -1000 or -inf)?"""
    fill = next((t for t in node.inputs[1:] if is_constant(t)), None)
    value = None if fill is None else constant_array(fill)
    return value is not None and value.size >= 1 and bool(np.all(value.astype(np.float64) <= -MASKED_BELOW))


def _masks_padding(grid: np.ndarray, lengths: list[int]) -> bool:
    """For every row (a request of length n padded to S) and every real query: one value on keys < n,
    masked on keys >= n. Bool grids (Where conditions): True on keys < n, False on the others."""
    for row, n in enumerate(lengths):
        queries = grid[row, :, : min(n, grid.shape[2])]
        keep, padding = queries[..., :n], queries[..., n:]
        if grid.dtype == bool:
            if not keep.all() or padding.any():
                return False
            continue
        keep = keep.astype(np.float64)
        level = keep[..., :1]
        if not np.isfinite(level).all() or np.abs(keep - level).max() > 1e-6 * max(1.0, float(np.abs(level).max())):
            return False
        if padding.size and not np.all(padding.astype(np.float64) <= level - MASKED_BELOW):
            return False
    return True


def _same_at_every_offset(grid: np.ndarray, lengths: list[int]) -> bool:
    """Does a request of length n at offset o of the full row (prefix mask of the row's length) see
    the values it sees at offset 0 (its own prefix mask)? Checked for every probe length n at the
    offsets 1, 2, half the room left and the last one."""
    full = grid[len(lengths) - 1]  # the row's longest prefix mask: every token real
    if full.shape[1] == 1:  # key-only (padding) terms: no query axis to move along
        return all(_equal(grid[row, :, :, :n], full[:, :, o : o + n]) for row, n in enumerate(lengths) for o in _offsets(full.shape[2], n))
    for row, n in enumerate(lengths):
        alone = grid[row, :, :n, :n]
        for o in _offsets(full.shape[2], n):
            if not _equal(alone, full[:, o : o + n, o : o + n]):
                return False
    return True


def _offsets(seq: int, n: int) -> Iterable[int]:
    room = seq - n
    return sorted({o for o in (1, 2, room // 2, room) if 0 < o <= room})


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == bool or b.dtype == bool:
        return bool(np.array_equal(a, b))
    a, b = a.astype(np.float64), b.astype(np.float64)
    masked_a, masked_b = a <= -MASKED_BELOW, b <= -MASKED_BELOW
    if not np.array_equal(masked_a, masked_b):
        return False
    kept = ~masked_a
    return bool(np.allclose(a[kept], b[kept], rtol=1e-5, atol=1e-6))
