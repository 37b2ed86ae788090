"""PopRT's signatures of AttentionMask and Unpack (as PopRT's packed DeBERTa script writes them) run
on the numpy kernels and, rewritten into poprt-lite's form, on the function bodies; both agree with
poprt-lite's own form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from poprt_lite import ops
from poprt_lite.errors import PoprtError

from .helpers import ONNX_OPSET, run_reference, session


def raw_model(nodes, inputs, outputs):
    """A model as a PopRT script leaves it: PopRT's op signatures, no function bodies."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), s) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), s) for n, d, s in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])


def packed_mask(rng, batch, seq):
    mask = np.zeros((batch, seq), np.int32)
    for row in mask:
        cuts = np.sort(rng.choice(np.arange(1, seq), size=2, replace=False))
        row[: cuts[0]], row[cuts[0]: cuts[1]] = 1, 2  # two requests, then padding
    return mask


def deberta_attention(data_type: str, dtype: str):
    """modify_deberta.py's masking: AttentionMask(mask, scores) added before Softmax, its Not after."""
    nodes = [
        helper.make_node("AttentionMask", ["mask", "scores"], ["am"], domain="ai.graphcore", dataType=data_type),
        helper.make_node("Cast", ["am"], ["am_bool"], to=TensorProto.BOOL),
        helper.make_node("Not", ["am_bool"], ["keep_bool"]),
        helper.make_node("Cast", ["keep_bool"], ["keep"], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype))),
        helper.make_node("Add", ["am", "scores"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=-1),
        helper.make_node("Mul", ["keep", "probs"], ["out"]),
    ]
    return raw_model(nodes, [("mask", "int32", [2, 6]), ("scores", dtype, [2, 3, 6, 6])], [("out", dtype, [2, 3, 6, 6])])


@pytest.mark.parametrize("data_type, dtype", [("FLOAT", "float32"), ("FLOAT16", "float16")])
def test_popRT_attention_mask_runs_on_kernels_and_bodies_alike(data_type, dtype):
    rng = np.random.default_rng(0)
    model = deberta_attention(data_type, dtype)
    onnx.checker.check_model(model)  # the schema takes PopRT's optional input and dataType attribute
    feeds = {"mask": packed_mask(rng, 2, 6), "scores": rng.normal(size=(2, 3, 6, 6)).astype(dtype)}
    (by_kernel,) = run_reference(model, feeds)
    ops.attach_functions(model)
    node = next(n for n in model.graph.node if n.op_type == "AttentionMask")
    assert list(node.input) == ["mask"] and [(a.name, a.i) for a in node.attribute] == [("dtype", 1 if dtype == "float32" else 10)]
    (by_body,) = session(onnx.shape_inference.infer_shapes(model, strict_mode=True)).run(None, feeds)
    assert by_body.dtype == np.dtype(dtype)
    np.testing.assert_allclose(by_body, by_kernel, atol=1e-3 if dtype == "float16" else 1e-6)
    ours = ops.get_op("AttentionMask").evaluate(feeds["mask"], dtype=1 if dtype == "float32" else 10)
    theirs = ops.get_op("AttentionMask").evaluate(feeds["mask"], feeds["scores"], dataType=data_type)
    np.testing.assert_array_equal(ours, theirs)
    assert ((by_kernel.sum(-1) == 0) == (feeds["mask"][:, None, :] == 0)).all()  # padding query rows zeroed


def test_popRT_attention_mask_bad_data_type_is_one_line():
    op = ops.get_op("AttentionMask")
    mask = np.ones((1, 2), np.int32)
    with pytest.raises(PoprtError, match=r"^AttentionMask: attribute 'dataType' must be FLOAT or FLOAT16, got 'DOUBLE'$"):
        op.evaluate(mask, dataType="DOUBLE")
    assert op.evaluate(mask, dataType="FLOAT16", dtype=1).dtype == np.float16  # dataType decides


def deberta_unpack(info_shape, sizes):
    """modify_deberta.py's Unpack: unpack_info int32 [max_valid_num, segment_num], segment_max_size=[L]."""
    node = helper.make_node("Unpack", ["x", "unpack_info"], ["out"], domain="ai.graphcore", max_valid_num=4, segment_max_size=sizes)
    return raw_model([node], [("x", "float32", [2, 5, 3]), ("unpack_info", "int32", info_shape)], [("out", "float32", [4, sizes[0], 3])])


def test_popRT_unpack_runs_on_kernels_and_bodies_alike():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    lengths = np.array([3, 4, 2, 0], np.int32)  # request 1 crosses the rows
    model = deberta_unpack([4, 1], [4])
    feeds = {"x": x, "unpack_info": lengths[:, None]}
    (by_kernel,) = run_reference(model, feeds)
    ops.attach_functions(model)
    onnx.checker.check_model(model)
    node = model.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"max_valid_num": 4, "segment_max_size": 4}
    (by_body,) = session(onnx.shape_inference.infer_shapes(model, strict_mode=True)).run(None, feeds)
    ours = ops.get_op("Unpack").evaluate(x, lengths, max_valid_num=4, segment_max_size=4)
    np.testing.assert_array_equal(by_kernel, ours)
    np.testing.assert_array_equal(by_body, ours)
    np.testing.assert_array_equal(ours[1, :4], np.concatenate([x[0, 3:], x[1, :2]]))


@pytest.mark.parametrize(
    "info_shape, sizes, message",
    [
        ([4, 2], [4], r"^Unpack: input 'unpack_info' of shape \[4, 2\]: poprt-lite unpacks one segment per request \(\[N\] or PopRT's \[N, 1\]\)$"),
        ([4, 1], [4, 2], r"^Unpack: segment_max_size=\[4, 2\] gives several segments per request \(PopRT's multi-segment packing\), which poprt-lite does not do; give one size$"),
    ],
)
def test_popRT_multi_segment_unpack_is_refused(info_shape, sizes, message):
    with pytest.raises(PoprtError, match=message):
        ops.attach_functions(model := deberta_unpack(info_shape, sizes))
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
