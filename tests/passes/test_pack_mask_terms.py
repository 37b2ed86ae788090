"""Packing never drops a mask term that carries more than the padding mask (issue 21).

The exports of testdata/make_mask_models.py combine the padding mask with a sliding-window band
(by Add, Where/And, Mul), a causal mask or a constant table, and ModernBERT alternates a global
layer with a 16-token window. Every (model, mode) pair either packs with every request equal to the
original run alone (tests/robustness/test_differential.py sweeps them through every API) or is
refused naming the node; here: what the packed graphs keep, the refusal, and the guard that stops a
pass that drops a term."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import poprt_lite
from conftest import TESTDATA, model_path
from passes.test_pack_passes import MODES, packed
from poprt_lite import ir, ops, runtime
from poprt_lite.compiler import CompileOptions
from poprt_lite.compiler.servable import check_servable
from poprt_lite.errors import PassError, PoprtError
from poprt_lite.passes import packing
from poprt_lite.passes.base import PassContext
from poprt_lite.patterns.attention import find_attention_blocks, token_content
from poprt_lite.patterns import mask_terms
from poprt_lite.vocab import MetaKey, PackMode
from robustness.test_differential import MODES as DIFFERENTIAL_MODES
from robustness.test_differential import assert_answers, requests_for

BAND_MODELS = [f"mask_{kind}_{exporter}" for kind in ("band_add", "band_where", "band_mul", "causal") for exporter in ("torchscript", "dynamo")]
MODERNBERT = ["modernbert_window_torchscript", "modernbert_window_dynamo"]


def accounts(model: onnx.ModelProto) -> dict:
    return json.loads(ir.get_metadata(model)[MetaKey.attention_masks.value])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [*BAND_MODELS, *MODERNBERT])
def test_the_band_stays_in_the_packed_graph(name, mode):
    """Layer 0's padding mask is replaced; layer 1's combined term is kept (recomputed on rows, or
    on the packed row in attention_mask mode), and the metadata says so, block by block."""
    model = packed(name, mode)
    (first, second) = sorted(accounts(model).items())
    assert first[1]["replaced"] and not first[1]["kept"]
    if name.startswith("mask_band_add"):  # the band is a bias next to a padding mask: both kept as they are
        assert second[1]["replaced"] and not second[1]["kept"]
    else:
        assert not second[1]["replaced"] and len(second[1]["kept"]) == 1
    if mode != PackMode.token_stream.value:
        return  # static shapes fold the band into a constant; the stream's dynamic length keeps its ops
    ops_in_graph = {n.op_type for n in model.graph.node}
    if "causal" in name:
        assert ops_in_graph & {"LessOrEqual", "GreaterOrEqual", "Less", "Greater"}
    else:  # the band: |j - i| <= window
        assert "Abs" in ops_in_graph


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_table_mixed_into_the_mask_is_refused_in_attention_mask_mode(exporter):
    name = f"mask_table_{exporter}"
    graph = ir.to_graph(ir.load_model(model_path(name)))
    layer = find_attention_blocks(graph, ["attention_mask"], ["input_ids"])[1]
    ((add, _),) = [(t.node.name, t) for t in layer.terms if t.mask_readers]
    softmax = layer.softmax.name
    with pytest.raises(PassError) as info:
        packed(name, PackMode.attention_mask.value)
    assert str(info.value) == (
        f"pass 'attention_mask_packing' failed: attention_mask packing cannot keep the score term that node '{add}' (Add) "
        f"adds before Softmax '{softmax}': it combines the padding mask with a constant table of per-position values "
        "('table', [128, 128]), which is not the same for a request placed later in a packed row as for the request alone; "
        "use pack_args mode=unpack_repack, which recomputes it on each request's own row"
    )


@pytest.mark.parametrize("name", ["mask_band_where_torchscript", "mask_band_mul_torchscript", "mask_causal_torchscript", "mask_band_add_dynamo"])
def test_fused_attention_leaves_the_layer_with_more_than_the_mask_alone(name, tmp_path):
    """fuse_packed_attention fuses layer 0 (its only term: the segment mask) and keeps layer 1,
    whose band or causal mask stays on the packed row; every request equals the original alone."""
    options = CompileOptions(**DIFFERENTIAL_MODES[PackMode.attention_mask], passes=["fuse_packed_attention"])
    artifact = poprt_lite.compile(TESTDATA / f"{name}.onnx", tmp_path / "m.onnx", output_dir=tmp_path, export_popef=True, options=options).artifact
    op_types = [n.op_type for n in poprt_lite.load_artifact(artifact).model().graph.node]
    assert op_types.count("MultiHeadAttention") == 1 and op_types.count("Softmax") == 1
    runner = runtime.Runner(str(artifact), threads=1)
    requests = requests_for(runner.interface, seed=3, count=9)
    assert_answers(name, requests, runner.run_requests(requests))


# ------------------------------------------------------------------------------------ the guard


def test_the_guard_refuses_a_block_left_without_a_packing_mask():
    graph = ir.to_graph(ir.load_model(model_path("mask_band_where_torchscript")))
    blocks = find_attention_blocks(graph, ["attention_mask"], ["input_ids"])
    with pytest.raises(PoprtError, match=r"^packing left attention at Softmax '/layers.0/Softmax' without a packing mask; refusing to write a model whose requests would see each other$"):
        packing.account_masks(PassContext(), blocks, lambda block: block.softmax)


def test_the_guard_refuses_a_pass_that_drops_a_combined_term():
    """A pass that bypasses the band-and-padding Where (as packing once did) is stopped, naming it."""
    graph = ir.to_graph(ir.load_model(model_path("mask_band_where_torchscript")))
    ir.infer_shapes_in_place(graph)
    blocks = find_attention_blocks(graph, ["attention_mask"], ["input_ids"])
    inputs = {t.name: t for t in graph.inputs}
    mask_terms.prove_padding_masks(graph, blocks, inputs["attention_mask"], tuple(inputs["input_ids"].shape[:2]), 16, token_content(graph, ["input_ids"]))
    segment = gs.Variable("segment_mask", dtype=np.float32)
    graph.nodes.append(gs.Node("AttentionMask", domain=ops.DOMAIN, inputs=[inputs["attention_mask"]], outputs=[segment], attrs={"dtype": 1}))
    for block in blocks:
        for where in block.where_masks:  # the old apply_mask: every Where bypassed
            scores = next(t for t in where.inputs[1:] if not isinstance(t, gs.Constant) and t.inputs and t.inputs[0].op != "Constant")
            ir.replace_all_uses(where.outputs[0], scores)
        out = gs.Variable(f"{block.softmax.name}_masked", dtype=np.float32)
        graph.nodes.append(gs.Node("Add", inputs=[block.softmax.inputs[0], segment], outputs=[out]))
        block.softmax.inputs[0] = out
    (where,) = blocks[1].where_masks
    with pytest.raises(PoprtError) as info:
        packing.account_masks(PassContext(), blocks, lambda block: block.softmax)
    assert str(info.value) == (
        f"packing dropped the mask term that node '{where.name}' (Where) applies before Softmax '/layers.1/Softmax'; "
        "it is not the padding mask alone, so the packed model would answer wrongly"
    )


def test_a_packed_model_without_the_mask_record_is_not_servable():
    model = packed("bert_qa_torchscript", PackMode.attention_mask.value)
    check_servable(model)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    kept = [p for p in stripped.metadata_props if not p.key.endswith(MetaKey.attention_masks.value)]
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(kept)
    with pytest.raises(PoprtError, match=r"^the packed model has no record of how its attention masks were packed"):
        check_servable(stripped)
