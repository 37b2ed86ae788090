"""The standard clean-ups: constant folding, dead-code removal, identity removal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from poprt_lite import ir, ops
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass


@register_pass("fold_constants")
class FoldConstants(Pass):
    """Fold every computation of constants (and of static shapes) into initializers, with onnxruntime."""

    @dataclass
    class Options:
        size_threshold_mb: int = 64  # folded tensors larger than this stay computed at run time

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        fold_until_stable(graph, self.options.size_threshold_mb)
        removed = before - len(graph.nodes)
        return PassResult(changed=removed > 0, message=f"{removed} nodes folded")


def fold_until_stable(graph: gs.Graph, size_threshold_mb: int = 64) -> None:
    """Alternate shape inference and onnx-graphsurgeon's folding until the node count stops falling
    (folding a Shape can make the next Reshape's shape constant, and so on)."""
    splits = _split_sliced_shapes(graph)
    # Folding evaluates partitions that may fail by design; keep onnxruntime's log quiet meanwhile.
    ort.set_default_logger_severity(4)
    try:
        while True:
            count = len(graph.nodes)
            graph.toposort()
            ir.infer_shapes_in_place(graph)
            _fold(graph, size_threshold_mb << 20)
            if len(graph.nodes) >= count:
                break
    finally:
        ort.set_default_logger_severity(2)
    _merge_unfolded_shapes(graph, splits)


def _fold(graph: gs.Graph, size_threshold: int) -> None:
    """One round of onnx-graphsurgeon's folding: every foldable value in one onnxruntime session,
    or, if that session fails (a partition that cannot run), partition by partition, skipping the
    ones that fail. Both fold the same values; the first creates one session instead of one per
    partition (48 on BERT-base)."""
    settings = dict(
        fold_shapes=True,
        size_threshold=size_threshold,
        # Custom ops are not in onnxruntime's schema set when folding, so they are left alone,
        # and so are their function bodies (onnx-graphsurgeon cannot fold inside functions).
        should_exclude_node=lambda node: node.domain == ops.DOMAIN or node.op == "SequenceEmpty",  # a sequence is no constant tensor
        recurse_functions=False,
    )
    try:
        graph.fold_constants(partitioning=None, error_ok=False, **settings)
    except Exception:
        graph.fold_constants(partitioning="basic", **settings)
    graph.cleanup()


def _split_sliced_shapes(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node, dict]]:
    """Rewrite `Shape(x, start, end)` (opset 15) as `Shape(x)` + `Slice`: onnx-graphsurgeon's shape
    folding ignores the start/end attributes and would fold the whole shape. Returns the
    (Shape, Slice, original attributes) of each split, for `_merge_unfolded_shapes`."""
    splits = []
    for node in [n for n in graph.nodes if n.op == "Shape" and ("start" in n.attrs or "end" in n.attrs)]:
        attrs = dict(node.attrs)
        start, end = node.attrs.pop("start", 0), node.attrs.pop("end", None)
        full = gs.Variable(f"{node.outputs[0].name}_full", dtype=np.int64)
        sliced = node.outputs[0]
        node.outputs[0] = full
        bounds = [np.array([start]), np.array([end if end is not None else np.iinfo(np.int64).max])]
        slice_node = gs.Node(
            "Slice",
            inputs=[full, *(gs.Constant(f"{sliced.name}_{k}", b.astype(np.int64)) for k, b in zip(("start", "end"), bounds))],
            outputs=[sliced],
        )
        graph.nodes.append(slice_node)
        splits.append((node, slice_node, attrs))
    return splits


def _merge_unfolded_shapes(graph: gs.Graph, splits: list[tuple[gs.Node, gs.Node, dict]]) -> None:
    """Put back `Shape(x, start, end)` where folding left a split's Shape and Slice as they were."""
    for shape, slice_node, attrs in splits:
        full = shape.outputs[0] if shape.outputs else None
        if full is None or not slice_node.inputs or slice_node.inputs[0] is not full or len(full.outputs) != 1:
            continue
        shape.attrs = attrs
        shape.outputs[0] = slice_node.outputs[0]
        slice_node.inputs.clear()
        slice_node.outputs.clear()
    if splits:
        graph.cleanup()


@register_pass("eliminate_dead_code")
class EliminateDeadCode(Pass):
    """Remove nodes, initializers and functions that no graph output depends on."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False)
        removed = before - len(graph.nodes)
        return PassResult(changed=removed > 0, message=f"{removed} nodes removed")


@register_pass("eliminate_identity")
class EliminateIdentity(Pass):
    """Remove Identity nodes, wiring their consumers to their input."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for node in [n for n in graph.nodes if n.op == "Identity"]:
            source, target = node.inputs[0], node.outputs[0]
            if target in graph.outputs:
                # The output name is the interface: move it onto the producer, unless the source is
                # itself an interface tensor (then the Identity is what gives the output its name).
                if source in graph.inputs or source in graph.outputs or isinstance(source, gs.Constant):
                    continue
                for consumer in list(source.outputs):
                    if consumer is not node:
                        ir.replace_input(consumer, source, target)
                producer = source.inputs[0]
                producer.outputs[producer.outputs.index(source)] = target
            else:
                for consumer in list(target.outputs):
                    ir.replace_input(consumer, target, source)
            node.inputs.clear()
            node.outputs.clear()
            removed += 1
        return PassResult(changed=removed > 0, message=f"{removed} Identity nodes removed")
