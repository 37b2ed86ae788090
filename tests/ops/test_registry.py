import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from poprt_lite import ops
from poprt_lite.errors import PoprtError

from .helpers import model_of, run_reference, session

NAMES = ["AttentionMask", "Unpack", "Repack", "PaddingMask", "SegmentPool"]


def test_registry_lists_ops_with_registered_schemas():
    assert [op.name for op in ops.list_ops()] == NAMES == list(ops.REGISTRY)
    for op in ops.list_ops():
        assert (op.domain, op.version) == (ops.DOMAIN, ops.OPSET_VERSION) == ("ai.graphcore", 1)
        assert op.doc and "\n" not in op.doc
        registered = onnx.defs.get_schema(op.name, ops.OPSET_VERSION, ops.DOMAIN)
        assert registered.doc == op.schema.doc and op.doc in registered.doc
        assert op.reference.__name__ == op.name and op.reference.op_domain == ops.DOMAIN
    assert ops.reference_ops() == [op.reference for op in ops.list_ops()]


def test_get_op_unknown_name():
    assert ops.get_op("Unpack") is ops.REGISTRY["Unpack"]
    with pytest.raises(PoprtError) as err:
        ops.get_op("Pack")
    assert str(err.value) == (
        "unknown ai.graphcore op 'Pack' (known: AttentionMask, Unpack, Repack, PaddingMask, SegmentPool)"
    )


def test_make_node_writes_defaults_and_rejects_unknown_attributes():
    node = ops.make_node("PaddingMask", ["info"], ["mask"], name="pm", segment_max_size=8)
    assert (node.domain, node.name) == (ops.DOMAIN, "pm")
    assert {a.name: a.i for a in node.attribute} == {"segment_max_size": 8, "dtype": TensorProto.FLOAT, "dynamic": 0}
    with pytest.raises(PoprtError) as err:
        ops.make_node("Unpack", ["x", "info"], ["y"], max_valid_num=2, segment_max_size=4, size=3)
    assert str(err.value) == "Unpack: unknown attribute 'size' (known: max_valid_num, segment_max_size, dynamic)"


def test_validate_inputs_counts_inputs():
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("Repack", np.zeros((2, 3)), np.zeros(2, np.int64))
    assert str(err.value) == "Repack: expected 3 inputs (y, unpack_info, packed_shape), got 2"


def packing_model(opset=17, attach=True):
    """Every op: Unpack -> Repack on x, PaddingMask from unpack_info, AttentionMask from mask,
    SegmentPool of x by segments."""
    nodes = [
        ops.make_node("Unpack", ["x", "unpack_info"], ["rows"], max_valid_num=3, segment_max_size=4),
        ops.make_node("Repack", ["rows", "unpack_info", "packed_shape"], ["packed"]),
        ops.make_node("PaddingMask", ["unpack_info"], ["row_mask"], segment_max_size=4),
        ops.make_node("AttentionMask", ["mask"], ["attention"], dtype=TensorProto.FLOAT16),
        ops.make_node("SegmentPool", ["x", "segments"], ["pooled"], max_valid_num=4, mode=1),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 2]),
         helper.make_tensor_value_info("unpack_info", TensorProto.INT32, [3]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("segments", TensorProto.INT32, ["B", "S"])],
        [onnx.ValueInfoProto(name=n) for n in ("rows", "packed", "row_mask", "attention", "pooled")],
        initializer=[onnx.numpy_helper.from_array(np.array([2, 4], np.int64), "packed_shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ops.attach_functions(model) if attach else model


FEEDS = {
    "x": np.arange(16, dtype=np.float32).reshape(2, 4, 2),
    "unpack_info": np.array([3, 4, 0], np.int32),
    "mask": np.array([[1, 1, 1, 2], [2, 2, 2, 0]], np.int64),
    "segments": np.array([[1, 1, 1, 2], [1, 1, 2, 0]], np.int32),
}


def test_attach_functions_is_idempotent():
    model = packing_model(attach=False)
    assert ops.attach_functions(model) is model
    once = model.SerializeToString()
    ops.attach_functions(model)
    assert model.SerializeToString() == once
    assert sorted(f.name for f in model.functions) == sorted(NAMES)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17), (ops.DOMAIN, 1)]


def test_attach_functions_leaves_models_without_custom_ops_alone():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert ops.attach_functions(model).SerializeToString() == before


def test_attach_functions_finds_ops_in_subgraphs():
    branch = helper.make_graph(
        [ops.make_node("PaddingMask", ["unpack_info"], ["m"], segment_max_size=2)], "then", [],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 1, 1, 2])],
    )
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["m"], value=onnx.numpy_helper.from_array(
            np.ones((2, 1, 1, 2), np.float32)))], "else", [],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 1, 1, 2])],
    )
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)
    model = model_of(
        [node], [("cond", "bool", []), ("unpack_info", "int32", [2])], ["out"]
    )
    assert [f.name for f in model.functions] == ["PaddingMask"]
    out = session(model).run(None, {"cond": np.array(True), "unpack_info": np.array([1, 2], np.int32)})[0]
    np.testing.assert_array_equal(out[:, 0, 0], [[0, -10000], [0, 0]])


@pytest.mark.parametrize("opset", [13, 15, 18, 21])
def test_functions_follow_model_opset_and_run_everywhere(opset):
    model = onnx.shape_inference.infer_shapes(packing_model(opset), strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    assert {f.name: dict((o.domain, o.version) for o in f.opset_import)[""] for f in model.functions} == {
        n: opset for n in NAMES
    }
    ort_out = session(model).run(None, FEEDS)
    kernels_out = run_reference(model, FEEDS)
    bodies_out = run_reference(model, FEEDS, kernels=False)
    for got, kernel, body in zip(ort_out, kernels_out, bodies_out, strict=True):
        np.testing.assert_array_equal(got, kernel)
        np.testing.assert_array_equal(got, body)
    np.testing.assert_array_equal(ort_out[1].reshape(-1, 2)[:7], FEEDS["x"].reshape(-1, 2)[:7])
    assert [helper.printable_type(o.type) for o in model.graph.output] == [
        "FLOAT, 3x4x2", "FLOAT, 2x4x2", "FLOAT, 3x1x1x4", "FLOAT16, Bx1xSxS", "FLOAT, 4x2",
    ]
    np.testing.assert_array_equal(ort_out[4], [[4, 5], [6, 7], [10, 11], [12, 13]])


def test_attach_functions_rejects_old_opset_and_other_domain_version():
    old = packing_model(opset=12, attach=False)
    before = old.SerializeToString()
    with pytest.raises(PoprtError) as err:
        ops.attach_functions(old)
    assert str(err.value) == (
        "AttentionMask: the function body needs ONNX opset >= 13, the model imports opset 12"
    )
    assert old.SerializeToString() == before
    model = packing_model(attach=False)
    model.opset_import.append(helper.make_opsetid(ops.DOMAIN, 2))
    with pytest.raises(PoprtError) as err:
        ops.attach_functions(model)
    assert str(err.value) == "model imports ai.graphcore version 2, poprt-lite provides version 1"
