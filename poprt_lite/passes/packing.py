"""What the packing passes share (not a pass itself): options, preconditions, the metadata record,
and the postconditions of a packed model (`check_servable`).

Graph matching lives in `patterns/`; this module reads and writes the pass metadata that tells a
runtime how the packed model is driven (pack spec, input roles, output layouts). `check_servable`
refuses, at compile time, a packed model that no runner could serve (dynamic shapes where the mode
needs static ones, a segment_max_size that no batch holds, an output no runner can split per
request), naming what is wrong and the option that fixes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from poprt_lite import ir, vocab
from poprt_lite.errors import PoprtError, option
from poprt_lite.passes.base import PassContext
from poprt_lite.patterns.attention import AttentionBlock, find_attention_blocks
from poprt_lite.runtime import modes
from poprt_lite.vocab import Layout, MetaKey, PackSpec, Role


@dataclass
class PackOptions:
    max_valid_num: int = 0
    segment_max_size: int = 0
    input_name: str = vocab.INPUT_IDS
    attention_mask_name: str = Role.attention_mask.value
    position_ids_name: str = Role.position_ids.value
    mode: str | None = None  # the mode recorded, one this pass packs (runtime/modes.py); None: the pass's own


@dataclass
class StreamOptions(PackOptions):
    """token_stream's options: a batch is at most `max_tokens` real tokens."""

    max_tokens: int = 0


@dataclass
class PackSetup:
    input_ids: gs.Variable
    attention_mask: gs.Variable | None
    blocks: list[AttentionBlock]


def prepare(graph: gs.Graph, ctx: PassContext, options: PackOptions, pass_name: str, one_row: bool = False) -> PackSetup:
    """Check that `graph` can be packed with `options`; find its attention blocks. `one_row`: a
    request lies inside one row, so a static row length bounds segment_max_size."""
    for key in ("max_valid_num", "segment_max_size"):
        if getattr(options, key) <= 0:
            raise PoprtError(f"{pass_name} needs {key} > 0 ({option('pack_args')} {key}=N)")
    if options.mode is not None and modes.get(options.mode, f"{pass_name} mode").pass_name != pass_name:
        raise PoprtError(f"{pass_name} cannot pack mode={options.mode}: {modes.get(options.mode).pass_name} does")
    inputs = {t.name: t for t in graph.inputs}
    if options.input_name not in inputs:
        raise PoprtError(f"model has no input '{options.input_name}'; packing needs the token ids as an input")
    table = vocab.int_of(ctx.metadata, MetaKey.position_table_size)
    offset = vocab.int_of(ctx.metadata, MetaKey.position_offset)
    if table and options.segment_max_size + offset > table:
        raise PoprtError(
            f"segment_max_size={options.segment_max_size} exceeds the model's position table ({table - offset} positions); use {option('pack_args')} segment_max_size<={table - offset}"
        )
    seq = (inputs[options.input_name].shape or [None, None])[1:2]
    if one_row and seq and isinstance(seq[0], int) and 0 < seq[0] < options.segment_max_size:
        raise PoprtError(_row_too_short(options.segment_max_size, options.input_name, inputs[options.input_name].shape, options.mode or modes.of_pass(pass_name).name))
    blocks = find_attention_blocks(graph, [options.attention_mask_name], [options.input_name])
    if not blocks:
        raise PoprtError("no attention blocks found (MatMul -> Softmax -> MatMul); packing needs a transformer encoder")
    if options.position_ids_name not in inputs and not _relative_positions_only(graph, options, blocks):
        raise PoprtError(
            f"{pass_name} needs '{options.position_ids_name}' as a model input: run export_position_ids before it ({option('pack_args')} does), and if that finds no position-id computation, export the model with a '{options.position_ids_name}' input"
        )
    return PackSetup(inputs[options.input_name], inputs.get(options.attention_mask_name), blocks)


def _relative_positions_only(graph: gs.Graph, options: PackOptions, blocks: list[AttentionBlock]) -> bool:
    """A model without position ids to restart: its attention carries score terms (relative
    positions, DeBERTa) and its embeddings no absolute-position lookup."""
    from poprt_lite.passes.export_position_ids import find_embeddings

    return any(block.biases for block in blocks) and find_embeddings(graph, options.input_name).position is None


def record(ctx: PassContext, mode: str, options: PackOptions, layouts: dict[str, Layout]) -> None:
    """Write the pack spec (of `options.mode`, else the pass's own `mode`), the input roles and the
    output layouts into the pass metadata."""
    max_tokens = getattr(options, "max_tokens", None) or None
    spec = PackSpec(options.mode or mode, options.max_valid_num, options.segment_max_size, max_tokens)
    vocab.set_pack_spec(ctx.metadata, spec)
    vocab.set_role(ctx.metadata, options.input_name, Role.dynamic_input)
    vocab.set_role(ctx.metadata, options.position_ids_name, Role.position_ids)
    vocab.set_role(ctx.metadata, options.attention_mask_name, Role.attention_mask)
    for name, layout in layouts.items():
        vocab.set_layout(ctx.metadata, name, layout)


def check_servable(model: onnx.ModelProto, source: str | os.PathLike | None = None) -> None:
    """Refuse a packed model that no runner can serve (see the module docstring); a model that is not
    packed passes. Raises PoprtError naming the input, output or node and the option that fixes it
    (the node is looked up in the `source` model file when the passes folded it away)."""
    meta = ir.get_metadata(model)
    spec = vocab.pack_spec_of(meta)
    if spec is None:
        return
    shapes = {
        value.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]
        for value in model.graph.input
    }
    dynamic = [name for name in shapes if vocab.role_of(meta, name) is Role.dynamic_input]
    mode = modes.get(spec.mode)
    if mode.static and dynamic:  # batches of a fixed [batch, seq_len]
        name, dims = dynamic[0], shapes[dynamic[0]]
        bound = vocab.int_of(meta, MetaKey.rows)  # --dynamic_rows: a dynamic row dim, at most this many
        if bound and len(dims) == 2 and not isinstance(dims[0], int) and isinstance(dims[1], int):
            dims = [bound, dims[1]]
        if len(dims) != 2 or not all(isinstance(d, int) and d > 0 for d in dims):
            raise PoprtError(
                f"a packed model needs static shapes, but input '{name}' has shape [{', '.join(map(str, dims))}]: "
                f"give input_shape {name}=B,S (the batch's rows and their length, e.g. {name}=16,256)"
            )
        rows, seq = dims
        if mode.one_row and spec.segment_max_size > seq:
            raise PoprtError(_row_too_short(spec.segment_max_size, name, dims, mode.name))
        if mode.layout.across_rows and spec.segment_max_size > rows * seq:
            raise PoprtError(
                f"segment_max_size={spec.segment_max_size} is more than the {rows * seq} tokens of a batch of "
                f"input '{name}' [{rows}, {seq}]; use pack_args segment_max_size<={rows * seq} or a larger input_shape"
            )
    tokens = shapes[dynamic[0]] if dynamic and mode.static else None
    for output in model.graph.output:
        layout = vocab.layout_of(meta, output.name)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in output.type.tensor_type.shape.dim]
        known = output.type.tensor_type.HasField("shape")
        if layout is Layout.global_:
            why = "holds neither per-token nor per-request values of a packed batch"
        elif layout is Layout.packed and tokens is not None and known and not _leads_with(dims, tokens):
            why = f"has shape [{', '.join(map(str, dims))}], not one value per token of the packed batch [{', '.join(map(str, tokens))}, ...]"
        else:
            continue
        raise PoprtError(
            f"output '{output.name}'{_produced_by(output.name, model, source)} {why}, so no runner can split it per "
            f"request; remove it from the packed model (remove_outputs {output.name})"
        )


def _produced_by(name: str, model: onnx.ModelProto, source: str | os.PathLike | None) -> str:
    """` (produced by node 'n' (Op))` for messages: the node in `model`, else in the source file
    (read without its weights, only when needed), else nothing."""
    graphs = [lambda: model]
    if source is not None:
        graphs.append(lambda: onnx.load(str(source), load_external_data=False))
    for graph in graphs:
        node = next((n for n in graph().graph.node if name in n.output), None)
        if node is not None:
            return f" (produced by node '{node.name}' ({node.op_type}))"
    return ""


def _leads_with(dims: list, lead: list) -> bool:
    """`dims` starts with `lead`, where a symbolic dim (not inferred) may be anything."""
    return len(dims) >= len(lead) and all(not isinstance(d, int) or d == want for d, want in zip(dims, lead))


def _row_too_short(segment_max_size: int, name: str, dims: list, mode: str) -> str:
    seq = dims[1]
    return (
        f"segment_max_size={segment_max_size} does not fit a row of input '{name}' [{', '.join(map(str, dims))}]: in "
        f"{mode} mode a request lies inside one row; use pack_args segment_max_size<={seq} "
        f"or input_shape {name}={dims[0]},{segment_max_size}"
    )
