"""Can a packed model be served? The compiler's check, run before anything is written.

A packed model that no runner could serve is refused, naming what is wrong and the option that
fixes it: first the postconditions of packing (dynamic shapes where the mode needs static ones, a
segment_max_size that no batch holds, an output no runner can split per request), then the packed
runners' own reading of the manifest the model would get (`runtime.interface`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from poprt_lite import ir, vocab
from poprt_lite.errors import PoprtError
from poprt_lite.ir import artifact
from poprt_lite.passes.packing import row_too_short
from poprt_lite.runtime import modes
from poprt_lite.runtime.interface import read_packed_interface
from poprt_lite.vocab import Layout, MetaKey, Role


def check_servable(model: onnx.ModelProto, precision: str = "fp32", source: str | os.PathLike | None = None) -> None:
    """Refuse a packed model that no runner can serve (see the module docstring); a model that is not
    packed passes. `model` may be the described form (`artifact.described_form`: weights not needed).
    Raises PoprtError naming the input, output or node and the option that fixes it (the node is
    looked up in the `source` model file when the passes folded it away)."""
    if vocab.pack_spec_of(ir.get_metadata(model)) is None:
        return
    _postconditions(model, source)
    try:
        read_packed_interface(artifact.manifest_only(model, precision))
    except PoprtError as exc:
        raise PoprtError(f"the converted model could not be served by a packed runner: {exc}") from exc


def export_artifact(path: str | os.PathLike, model: onnx.ModelProto | ir.Model, manifest_fields: dict[str, Any]) -> Path:
    """`artifact.write_artifact`, refusing first a packed model no runner could serve (nothing is written)."""
    working = model if isinstance(model, ir.Model) else ir.Model.from_proto(model)
    check_servable(artifact.described_form(working), manifest_fields.get(MetaKey.precision.value, "fp32"))
    return artifact.write_artifact(path, working, manifest_fields)


def _postconditions(model: onnx.ModelProto, source: str | os.PathLike | None) -> None:
    """The postconditions of packing, each with its fix."""
    meta = ir.get_metadata(model)
    if MetaKey.attention_masks.value not in meta:
        raise PoprtError(
            "the packed model has no record of how its attention masks were packed (a packing pass must end with "
            "packing.account_masks); convert the original model with poprt-lite's packing passes"
        )
    spec = vocab.pack_spec_of(meta)
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
            raise PoprtError(row_too_short(spec.segment_max_size, name, dims, mode.name))
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
