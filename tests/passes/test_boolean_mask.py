"""sdpa-style boolean masking, `Where(keep, scores, -inf)`, is found and replaced like an additive mask."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import make_request, model_path, run
from poprt_lite import compile, ir
from poprt_lite.compiler import verify
from poprt_lite.compiler import CompileOptions


@pytest.fixture(scope="module")
def boolean_mask_model(tmp_path_factory):
    """bert_qa_torchscript with each `Add(scores, mask)` rewritten as `Where(mask == 0, scores, -inf)`."""
    graph = ir.to_graph(ir.load_model(model_path("bert_qa_torchscript")))
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        add = softmax.inputs[0].inputs[0]
        scores, mask = add.inputs
        keep = gs.Variable(f"{softmax.name}_keep", dtype=np.bool_)
        graph.nodes.append(gs.Node("Equal", inputs=[mask, gs.Constant(f"{softmax.name}_zero", np.array(0, np.float32))], outputs=[keep]))
        fill = gs.Constant(f"{softmax.name}_fill", np.array(-np.inf, np.float32))
        add.op = "Where"
        add.inputs.clear()
        add.inputs.extend([keep, scores, fill])
    path = tmp_path_factory.mktemp("m") / "boolean_mask.onnx"
    ir.save_model(ir.to_model(graph.cleanup().toposort(), ir.load_model(model_path("bert_qa_torchscript"))), path)
    return path


def test_boolean_mask_model_matches_the_additive_one(boolean_mask_model, rng):
    request = make_request(rng, 9)
    for want, got in zip(run(model_path("bert_qa_torchscript"), request), run(boolean_mask_model, request), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask"])
def test_boolean_mask_is_replaced(boolean_mask_model, mode):
    options = CompileOptions(input_shape={"input_ids": (3, 16)}, pack_args={"max_valid_num": "5", "segment_max_size": "16", "mode": mode})
    model = compile(boolean_mask_model, save=False, options=options).model
    assert not [n for n in model.graph.node if n.op_type == "Where"]
    diffs = verify.max_abs_diff(ir.load_model(model_path("bert_qa_torchscript")), model)
    assert max(diffs.values()) < 1e-4
