"""What the packing passes share (not a pass itself): options, preconditions and the metadata record.

Graph matching lives in `patterns/`; this module reads and writes the pass metadata that tells a
runtime how the packed model is driven (pack spec, input roles, output layouts). Whether the packed
model a whole pipeline made can be served is the compiler's check (compiler/servable.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from poprt_lite import ops, vocab
from poprt_lite.errors import PoprtError, option
from poprt_lite.passes.base import PassContext
from poprt_lite.patterns import mask_terms
from poprt_lite.patterns.attention import AttentionBlock, find_attention_blocks, token_content
from poprt_lite.patterns.layout import TokenAxes, token_dims
from poprt_lite.patterns.rotary import unrecognized_rotary
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
    dims: TokenAxes
    content: set[int]  # ids of the activations (`token_content`)
    row: int  # the longest row a request is attended on: the packed row (one_row) or segment_max_size


def prepare(graph: gs.Graph, ctx: PassContext, options: PackOptions, pass_name: str, one_row: bool = False) -> PackSetup:
    """Check that `graph` can be packed with `options`; find its attention blocks and prove which of
    their mask terms are the padding mask alone (`patterns/mask_terms.py`: only those may be
    replaced). `one_row`: a request lies inside one row, so a static row length bounds
    segment_max_size, and the row is what attention sees."""
    for key in ("max_valid_num", "segment_max_size"):
        if getattr(options, key) <= 0:
            raise PoprtError(f"{pass_name} needs {key} > 0 ({option('pack_args')} {key}=N)")
    if options.mode is not None and modes.get(options.mode, f"{pass_name} mode").pass_name != pass_name:
        raise PoprtError(f"{pass_name} cannot pack mode={options.mode}: {modes.get(options.mode).pass_name} does")
    inputs = {t.name: t for t in graph.inputs}
    if options.input_name not in inputs:
        raise PoprtError(f"model has no input '{options.input_name}'; packing needs the token ids as an input")
    _refuse_whole_tensor_quantization(graph)
    table = vocab.int_of(ctx.metadata, MetaKey.position_table_size)
    offset = vocab.int_of(ctx.metadata, MetaKey.position_offset)
    if table and options.segment_max_size + offset > table:
        raise PoprtError(
            f"segment_max_size={options.segment_max_size} exceeds the model's position table ({table - offset} positions); use {option('pack_args')} segment_max_size<={table - offset}"
        )
    seq = (inputs[options.input_name].shape or [None, None])[1:2]
    if one_row and seq and isinstance(seq[0], int) and 0 < seq[0] < options.segment_max_size:
        raise PoprtError(row_too_short(options.segment_max_size, options.input_name, inputs[options.input_name].shape, options.mode or modes.of_pass(pass_name).name))
    blocks = find_attention_blocks(graph, [options.attention_mask_name], [options.input_name])
    if not blocks:
        raise PoprtError("no attention blocks found (MatMul -> Softmax -> MatMul); packing needs a transformer encoder")
    if options.position_ids_name not in inputs and not _relative_positions_only(graph, options, blocks):
        unrecognized = unrecognized_rotary(graph, token_content(graph, [options.input_name]))
        if unrecognized:
            raise PoprtError(
                f"{pass_name} needs rotary positions that restart at each request, and {unrecognized}: not a form export_position_ids can replace with a '{options.position_ids_name}' input; "
                f"export the model with a '{options.position_ids_name}' input that the angles are computed from"
            )
        raise PoprtError(
            f"{pass_name} needs '{options.position_ids_name}' as a model input: run export_position_ids before it ({option('pack_args')} does), and if that finds no position-id computation, export the model with a '{options.position_ids_name}' input"
        )
    row = seq[0] if one_row and seq and isinstance(seq[0], int) and seq[0] > 0 else options.segment_max_size
    dims = token_dims(graph, options.input_name)
    content = token_content(graph, [options.input_name])
    mask = inputs.get(options.attention_mask_name)
    mask_terms.prove_padding_masks(graph, blocks, mask, tuple(inputs[options.input_name].shape[:2]), row, content)
    return PackSetup(inputs[options.input_name], mask, blocks, dims, content, row)


# Ops that quantize an activation with one scale for the whole tensor: onnxruntime.quantization's
# quantize_dynamic inserts DynamicQuantizeLinear before each MatMulInteger; onnxruntime's own
# optimizer fuses the pair into DynamicQuantizeMatMul.
WHOLE_TENSOR_QUANTIZERS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul")


def _refuse_whole_tensor_quantization(graph: gs.Graph) -> None:
    """A scale computed over the whole packed batch would make each request's answer depend on the
    others in its batch, in every mode: refuse, naming the first such node."""
    node = next((n for n in graph.nodes if n.op in WHOLE_TENSOR_QUANTIZERS), None)
    if node is not None:
        raise PoprtError(
            f"node '{node.name}' ({node.op}) quantizes its input with one scale for the whole tensor (quantize_dynamic's "
            f"activations): in a packed batch every request's answer would depend on the other requests in it, in every "
            f"packing mode; pack the float32 model with {option('precision')} int8 (activations quantized per token) instead"
        )


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


def account_masks(ctx: PassContext, blocks: list[AttentionBlock], softmax_of: Callable[[AttentionBlock], gs.Node], twin: Callable[[gs.Tensor], gs.Tensor] = lambda t: t) -> None:
    """The guard every packing pass ends with: each attention block (the Softmax that now computes
    it: `softmax_of(block)`) must be masked by packing's own mask (AttentionMask / PaddingMask), and
    must still read every mask term that was not proven to be the padding mask alone (`twin(t)`: the
    term as the pass placed it, e.g. recomputed on rows). Records what was replaced and kept
    (`MetaKey.attention_masks`), which `check_servable` requires of a packed model."""
    accounts = {}
    for block in blocks:
        softmax = softmax_of(block)
        nodes, tensors = _ancestors(softmax.inputs[0])
        if not any(n.domain == ops.DOMAIN and n.op in PACKING_MASKS for n in nodes):
            raise PoprtError(f"packing left attention at Softmax '{block.softmax.name}' without a packing mask; refusing to write a model whose requests would see each other")
        kept = []
        for node, tensor in block.combined:
            if id(twin(tensor)) not in tensors:
                raise PoprtError(
                    f"packing dropped the mask term that node '{node.name}' ({node.op}) applies before Softmax '{block.softmax.name}'; "
                    "it is not the padding mask alone, so the packed model would answer wrongly"
                )
            kept.append(_name(node))
        replaced = [_name(t.node) for t in block.terms if t.masks] + [_name(n) for n in block.padding_wheres]
        accounts[_name(block.softmax)] = {"replaced": replaced, "kept": kept}
    ctx.metadata[MetaKey.attention_masks.value] = json.dumps(accounts, sort_keys=True)


PACKING_MASKS = ("AttentionMask", "PaddingMask")


def _name(node: gs.Node) -> str:
    """A node by its name, or by its output's where the exporter gave it none."""
    return node.name or node.outputs[0].name


def _ancestors(tensor: gs.Tensor) -> tuple[list[gs.Node], set[int]]:
    """The nodes `tensor` is computed from, and the ids of the tensors on the way."""
    nodes, seen, stack = [], set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.inputs:
            nodes.append(t.inputs[0])
            stack.extend(t.inputs[0].inputs)
    return nodes, seen


def row_too_short(segment_max_size: int, name: str, dims: list, mode: str) -> str:
    seq = dims[1]
    return (
        f"segment_max_size={segment_max_size} does not fit a row of input '{name}' [{', '.join(map(str, dims))}]: in "
        f"{mode} mode a request lies inside one row; use pack_args segment_max_size<={seq} "
        f"or input_shape {name}={dims[0]},{segment_max_size}"
    )
