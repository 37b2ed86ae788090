import numpy as np
import onnx
from onnx import TensorProto, helper

from poprt_lite.passes import PassManager, get_pass


def identity_model():
    # x -> Identity -> Relu -> Identity -> y (graph output), plus a dead Neg branch
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["y"]),
        helper.make_node("Neg", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_eliminate_identity_keeps_output_names():
    model, records = PassManager([get_pass("eliminate_identity")()]).run(identity_model())
    assert records[0].message == "2 Identity nodes removed"
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [("Relu", ["x"], ["y"])]
    assert [o.name for o in model.graph.output] == ["y"]


def test_identity_from_input_to_output_stays():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model, records = PassManager([get_pass("eliminate_identity")()]).run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert records[0].changed is False and len(model.graph.node) == 1


def test_dead_code_is_removed_and_unused_inputs_kept():
    model = identity_model()
    model.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1]))
    out, records = PassManager([get_pass("eliminate_dead_code")()]).run(model)
    # the manager cleans up after every pass too, so the count is what this pass saw
    assert "Neg" not in [n.op_type for n in out.graph.node]
    assert [i.name for i in out.graph.input] == ["x", "unused"]


def test_fold_constants_folds_constant_subgraph():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])),
        helper.make_node("Mul", ["c", "c"], ["c2"]),
        helper.make_node("Add", ["x", "c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
    )
    out, records = PassManager([get_pass("fold_constants")()]).run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in out.graph.node] == ["Add"]
    folded = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(folded[out.graph.node[0].input[1]], [1.0, 4.0])


def test_fold_constants_leaves_an_unfoldable_sliced_shape_as_it_was():
    # Shape(start=2) of a static dim folds; Shape(start=1, end=2) of a dynamic dim cannot, and the
    # Shape + Slice the pass splits it into for folding must not be left behind.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,M,3] x) => (int64[1] s, int64[1] t) {
            s = Shape <start = 1, end = 2> (x)
            t = Shape <start = 2> (x)
        }
    """)
    out, records = PassManager([get_pass("fold_constants")()]).run(model)
    assert records[0].message == "1 nodes folded"
    assert [(n.op_type, {a.name: a.i for a in n.attribute}, list(n.input), list(n.output)) for n in out.graph.node] == [
        ("Shape", {"start": 1, "end": 2}, ["x"], ["s"]),
    ]
    assert [(t.name, list(onnx.numpy_helper.to_array(t))) for t in out.graph.initializer] == [("t", [3])]
