"""export_position_ids: make the position ids a graph input, found by structure, not by names.

Exporters compute the ids fed to the position-embedding Gather inside the graph: a slice of a
constant buffer driven by `Shape(input_ids)` (TorchScript BERT), a Range (DistilBERT, dynamo), or a
cumulative sum over the non-padding tokens plus `padding_idx` (RoBERTa). Whatever the subgraph, it
is found from the embedding sum: the word-embedding Gather reads `input_ids`; the Adds that its
output flows into also receive the position-embedding Gather, the one with the largest table among
those whose indices are computed in the graph (and are not one value repeated, as token types of
zeros are). The subgraph is then evaluated once on a probe request to learn the offset of the first
position (2 for RoBERTa), which is recorded in the model metadata (`poprt_lite.position_offset`) so
a runtime fills position ids correctly. Rotary encoders have no position table: `patterns/rotary.py`
finds the position row their Cos / Sin angles are computed from, or the Range indexing their table
of sin / cos rows (whose rows are then broadcast per batch row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir, vocab
from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass
from poprt_lite.patterns.attention import constant_array, producer, token_content
from poprt_lite.patterns.rotary import find_rotary_positions, unrecognized_rotary, unsqueeze_axes
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import MetaKey, Role

PROBE_LENGTH = 8


@dataclass
class Embeddings:
    word: gs.Node
    position: gs.Node | None

    @property
    def vocab_size(self) -> int:
        return int(self.word.inputs[0].shape[0])


@register_pass("export_position_ids")
class ExportPositionIds(Pass):
    """Replace the in-graph position-id computation with a new graph input `position_ids`."""

    @dataclass
    class Options:
        input_name: str = vocab.INPUT_IDS
        position_ids_name: str = Role.position_ids.value
        dtype: str = "int64"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        name = self.options.position_ids_name
        embeddings = find_embeddings(graph, self.options.input_name)
        vocab.set_int(ctx.metadata, MetaKey.vocab_size, embeddings.vocab_size)
        vocab.set_role(ctx.metadata, self.options.input_name, Role.dynamic_input)
        if any(t.name == name for t in graph.inputs):
            return PassResult(changed=False, message=f"'{name}' is already an input")
        gather = embeddings.position
        if gather is None:
            return self._export_rotary(graph, ctx)
        indices = gather.inputs[1]
        offset = _probe_offset(graph, indices, embeddings)
        input_ids = next(t for t in graph.inputs if t.name == self.options.input_name)
        position_ids = gs.Variable(name, dtype=np.dtype(self.options.dtype), shape=list(input_ids.shape))
        graph.inputs.append(position_ids)
        gather.inputs[1] = position_ids
        vocab.set_int(ctx.metadata, MetaKey.position_offset, offset)
        vocab.set_int(ctx.metadata, MetaKey.position_table_size, gather.inputs[0].shape[0])
        vocab.set_role(ctx.metadata, name, Role.position_ids)
        return PassResult(changed=True, message=f"'{indices.name}' -> input '{name}' (offset {offset})")

    def _export_rotary(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rotary encoders: the position row their angles are computed from becomes the input."""
        content = token_content(graph, [self.options.input_name])
        rotary = find_rotary_positions(graph, content)
        if rotary is None:
            unrecognized = unrecognized_rotary(graph, content)
            found = f"rotary positions not recognized: {unrecognized}" if unrecognized else "no position-id computation found"
            return PassResult(changed=False, message=f"{found}; model unchanged")
        name = self.options.position_ids_name
        input_ids = next(t for t in graph.inputs if t.name == self.options.input_name)
        position_ids = gs.Variable(name, dtype=np.dtype(self.options.dtype), shape=list(input_ids.shape))
        graph.inputs.append(position_ids)
        source = position_ids
        if rotary.positions.dtype is not None and np.dtype(rotary.positions.dtype) != position_ids.dtype:
            source = gs.Variable(ir.unique_name(graph, f"{name}_cast"), dtype=rotary.positions.dtype)
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(rotary.positions.dtype))
            graph.nodes.append(gs.Node("Cast", inputs=[position_ids], outputs=[source], attrs={"to": to}))
        for node in rotary.readers:
            for i, tensor in enumerate(node.inputs):
                if tensor is rotary.positions:
                    node.inputs[i] = source
        for chain in rotary.broadcast:
            _broadcast_by_row(graph, chain)
        for reshape in rotary.pinned:
            _keep_batch(graph, reshape)
        vocab.set_int(ctx.metadata, MetaKey.position_offset, 0)
        vocab.set_role(ctx.metadata, name, Role.position_ids)
        angles = ", ".join(f"'{n.name}'" for n in rotary.angles[:2])
        return PassResult(changed=True, message=f"rotary positions '{rotary.positions.name}' (angles {angles}, ...) -> input '{name}'")


def _broadcast_by_row(graph: gs.Graph, chain: list[gs.Node]) -> None:
    """A table lookup now reads position ids [batch, seq]: its [batch, seq, d] rows take the place
    of [1, ..., 1, seq, d] (the `chain` of Unsqueezes adding k >= 2 leading axes) as
    [batch, 1, ..., seq, d]: the last Unsqueeze reads the lookup and adds axes 1 .. k-1."""
    leading = sum(len(unsqueeze_axes(node)) for node in chain)
    last = chain[-1]
    last.inputs[0] = chain[0].inputs[0]
    axes = np.arange(1, leading, dtype=np.int64)
    if "axes" in last.attrs:
        last.attrs["axes"] = axes.tolist()
    else:
        last.inputs[1] = gs.Constant(ir.unique_name(graph, f"{last.name}_row_axes"), axes)


def _keep_batch(graph: gs.Graph, reshape: gs.Node) -> None:
    """A Reshape to a constant shape of batch 1 keeps the batch of its input instead (0: copy)."""
    shape = np.asarray(constant_array(reshape.inputs[1])).copy()
    shape[0] = 0
    reshape.inputs[1] = gs.Constant(ir.unique_name(graph, f"{reshape.name}_batch_shape"), shape)
    if "allowzero" in reshape.attrs:  # opset 14 on; 0 (copy the input's dim) is the default
        reshape.attrs["allowzero"] = 0


def find_embeddings(graph: gs.Graph, input_name: str = vocab.INPUT_IDS) -> Embeddings:
    inputs = {t.name: t for t in graph.inputs}
    if input_name not in inputs:
        raise PoprtError(f"model has no input '{input_name}' (inputs: {', '.join(inputs)}); is this a BERT-like encoder?")
    fused = next((n for n in graph.nodes if n.op == "EmbedLayerNormalization"), None)
    if fused is not None:
        raise PoprtError(
            f"the embeddings are fused into EmbedLayerNormalization node '{fused.name}' (onnxruntime's transformer optimizer); run unfuse_ort before export_position_ids (the default pipeline does)"
        )
    word = next((n for n in inputs[input_name].outputs if _is_table_lookup(n) and n.inputs[1] is inputs[input_name]), None)
    if word is None:
        raise PoprtError(f"no embedding Gather reads '{input_name}'; is this a BERT-like encoder?")
    # The Adds that sum the embeddings, reached from the word embedding through Adds (and Casts).
    adds, frontier = [], [word.outputs[0]]
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if node.op in ("Add", "Cast") and node not in adds:
                adds.append(node)
                frontier.extend(node.outputs)
    computed = [
        node
        for add in adds
        for tensor in add.inputs
        for node in tensor.inputs
        if _is_table_lookup(node)
        and node is not word
        and not isinstance(node.inputs[1], gs.Constant)
        and node.inputs[1] not in graph.inputs
        and not _is_fill(node.inputs[1])
    ]
    position = max(computed, key=lambda n: n.inputs[0].shape[0], default=None)
    return Embeddings(word=word, position=position)


def _is_fill(tensor: gs.Tensor) -> bool:
    """`tensor` is one value repeated to a computed shape (token types of zeros when the model is
    exported without them: ConstantOfShape, or a constant expanded or sliced), not positions."""
    node = producer(tensor)
    while node is not None and node.op in ("Expand", "Slice", "Cast", "Unsqueeze", "Reshape", "Squeeze"):
        tensor = node.inputs[0]
        node = producer(tensor)
    if node is not None and node.op == "ConstantOfShape":
        return True
    value = constant_array(tensor)
    return value is not None and value.size > 0 and bool(np.all(value == value.reshape(-1)[0]))


def _is_table_lookup(node: gs.Node) -> bool:
    return (
        node.op == "Gather"
        and node.attrs.get("axis", 0) == 0
        and isinstance(node.inputs[0], gs.Constant)
        and len(node.inputs[0].shape) == 2
    )


def _probe_offset(graph: gs.Graph, indices: gs.Tensor, embeddings: Embeddings) -> int:
    """Evaluate the position-id subgraph on one unpadded request and return its first position.

    Fails unless the ids are a contiguous range, the only layout a host can reproduce per request.
    """
    probe = graph.copy()
    target = probe.tensors()[indices.name]
    probe.outputs = [target]
    probe.cleanup(remove_unused_graph_inputs=True).toposort()
    ir.infer_shapes_in_place(probe)
    if target.dtype is None:
        target.dtype = np.int64
    # The highest token id is never a padding id, so RoBERTa-style masks see a full request.
    token = embeddings.vocab_size - 1
    feeds = {}
    for tensor in probe.inputs:
        value = token if tensor.name == embeddings.word.inputs[1].name else (1 if "mask" in tensor.name else 0)
        feeds[tensor.name] = np.full((1, PROBE_LENGTH), value, dtype=tensor.dtype)
    try:
        session = create_session(gs.export_onnx(probe, do_type_check=False))
        ids = np.asarray(session.run(None, feeds)[0]).reshape(-1)
    except Exception as exc:
        raise PoprtError(f"cannot evaluate the position-id computation feeding '{indices.name}': {exc}") from exc
    expected = np.arange(PROBE_LENGTH) + ids[0]
    if ids.shape != expected.shape or not np.array_equal(ids, expected):
        raise PoprtError(
            f"position ids feeding '{indices.name}' are not a contiguous range per request (probe gave {ids.tolist()}); cannot export them"
        )
    return int(ids[0])
