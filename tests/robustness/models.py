"""Small hand-built ONNX models for the robustness tests (built with onnx.helper, no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, POSITIONS = 50, 8, 64


def _model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="robustness-tests")
    model.ir_version = 8
    return model


def _ids(name: str = "input_ids") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])


def _out(name: str = "out", shape=("batch", "seq", HIDDEN)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _table(name: str, rows: int, seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal((rows, HIDDEN)).astype(np.float32), name)


def embeddings(position: str = "computed") -> tuple[list, list, list, str]:
    """Word (+ position) embeddings of `input_ids`.

    position: "computed" (Range over Shape(input_ids), as exporters emit), "input" (the position
    ids are already an input, named `pos`), or "none" (no position embedding at all).
    Returns nodes, extra inputs, initializers and the name of the summed embedding.
    """
    nodes = [helper.make_node("Gather", ["word_table", "input_ids"], ["word"], name="word_embedding")]
    inits = [_table("word_table", VOCAB, 0)]
    inputs = []
    if position == "none":
        return nodes, inputs, inits, "word"
    inits.append(_table("pos_table", POSITIONS, 1))
    if position == "computed":
        inits += [
            numpy_helper.from_array(np.array(1, np.int64), "one_index"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array(1, np.int64), "step"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ]
        nodes += [
            helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="shape"),
            helper.make_node("Gather", ["ids_shape", "one_index"], ["seq_len"], name="seq_len"),
            helper.make_node("Range", ["zero", "seq_len", "step"], ["positions"], name="range"),
            helper.make_node("Unsqueeze", ["positions", "axis0"], ["pos_ids"], name="unsqueeze"),
        ]
        pos_ids = "pos_ids"
    else:
        inputs.append(_ids("pos"))
        pos_ids = "pos"
    nodes += [
        helper.make_node("Gather", ["pos_table", pos_ids], ["pos_emb"], name="position_embedding"),
        helper.make_node("Add", ["word", "pos_emb"], ["emb"], name="embedding_sum"),
    ]
    return nodes, inputs, inits, "emb"


def encoder(position: str = "computed", attention: bool = True, opset: int = 13) -> onnx.ModelProto:
    """A one-layer, one-head encoder: embeddings -> (attention) -> MatMul head."""
    nodes, extra_inputs, inits, hidden = embeddings(position)
    rng = np.random.default_rng(2)

    def weight(name: str) -> str:
        inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), name))
        return name

    if attention:
        inits += [
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
            numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
            numpy_helper.from_array(np.array(1.0, np.float32), "onef"),
        ]
        nodes += [
            helper.make_node("Unsqueeze", [hidden, "axis1"], ["x4"], name="heads"),  # [B,1,S,H]
            helper.make_node("MatMul", ["x4", weight("wq")], ["q"], name="q"),
            helper.make_node("MatMul", ["x4", weight("wk")], ["k"], name="k"),
            helper.make_node("MatMul", ["x4", weight("wv")], ["v"], name="v"),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="kt"),
            helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="mask_cast"),
            helper.make_node("Unsqueeze", ["mask_f", "axes12"], ["mask4"], name="mask_unsqueeze"),
            helper.make_node("Sub", ["onef", "mask4"], ["inv"], name="mask_inv"),
            helper.make_node("Mul", ["inv", "neg"], ["bias"], name="mask_bias"),
            helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
            helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
            helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
            helper.make_node("Squeeze", ["context", "axis1"], ["ctx3"], name="merge_heads"),
        ]
        hidden = "ctx3"
        extra_inputs.append(_ids("attention_mask"))
    nodes.append(helper.make_node("MatMul", [hidden, weight("head")], ["out"], name="head"))
    return _model(nodes, [_ids(), *extra_inputs], [_out()], inits, opset=opset)


def tiny(op: str = "Relu", domain: str = "", opset: int = 13) -> onnx.ModelProto:
    """x -> <op> -> y: the smallest model with one node of `op`."""
    node = helper.make_node(op, ["x"], ["y"], name="the_node", domain=domain)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph([node], "g", [x], [_out("y", (2, 3))])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def cycle() -> onnx.ModelProto:
    """a = Add(x, b); b = Relu(a): each node reads the other's output."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Identity", ["b"], ["y"], name="out"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    return _model(nodes, [x], [_out("y", (2, 3))])


def dangling() -> onnx.ModelProto:
    """Add reads `ghost`, which no node, input or initializer provides."""
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add_ghost")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    return _model(nodes, [x], [_out("y", (2, 3))])
