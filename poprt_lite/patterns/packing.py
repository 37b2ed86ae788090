"""What both packing passes share: options, preconditions and the manifest record."""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import PassContext
from poprt_lite.patterns.attention import AttentionBlock, find_attention_blocks


@dataclass
class PackOptions:
    max_valid_num: int = 0
    segment_max_size: int = 0
    input_name: str = "input_ids"
    attention_mask_name: str = "attention_mask"
    position_ids_name: str = "position_ids"


@dataclass
class PackSetup:
    input_ids: gs.Variable
    attention_mask: gs.Variable | None
    blocks: list[AttentionBlock]


def prepare(graph: gs.Graph, ctx: PassContext, options: PackOptions, pass_name: str) -> PackSetup:
    """Check that `graph` can be packed with `options`; find its attention blocks."""
    for key in ("max_valid_num", "segment_max_size"):
        if getattr(options, key) <= 0:
            raise PoprtError(f"{pass_name} needs {key} > 0 (--pack_args {key}=N)")
    inputs = {t.name: t for t in graph.inputs}
    if options.input_name not in inputs:
        raise PoprtError(f"model has no input '{options.input_name}'; packing needs the token ids as an input")
    if options.position_ids_name not in inputs:
        raise PoprtError(
            f"{pass_name} needs '{options.position_ids_name}' as a model input: run export_position_ids before it (--pack_args does), and if that finds no position-id computation, export the model with a '{options.position_ids_name}' input"
        )
    table = int(ctx.metadata.get("position_table_size", 0))
    offset = int(ctx.metadata.get("position_offset", 0))
    if table and options.segment_max_size + offset > table:
        raise PoprtError(
            f"segment_max_size={options.segment_max_size} exceeds the model's position table ({table - offset} positions); use --pack_args segment_max_size<={table - offset}"
        )
    blocks = find_attention_blocks(graph)
    if not blocks:
        raise PoprtError("no attention blocks found (MatMul -> Softmax -> MatMul); packing needs a transformer encoder")
    return PackSetup(inputs[options.input_name], inputs.get(options.attention_mask_name), blocks)


def record(ctx: PassContext, mode: str, options: PackOptions, layouts: dict[str, str]) -> None:
    ctx.metadata["pack"] = json.dumps(
        {"mode": mode, "max_valid_num": options.max_valid_num, "segment_max_size": options.segment_max_size}
    )
    ctx.metadata[f"role.{options.input_name}"] = "dynamic_input"
    ctx.metadata[f"role.{options.position_ids_name}"] = "position_ids"
    ctx.metadata[f"role.{options.attention_mask_name}"] = "attention_mask"
    for name, layout in layouts.items():
        ctx.metadata[f"layout.{name}"] = layout
