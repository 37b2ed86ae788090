"""The structural diff: names and order do not matter, each kind of change is reported exactly."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ALL_MODELS, model_path
from poprt_lite.errors import PoprtError
from poprt_lite.tools.diff import (
    AttributeChange,
    FieldChange,
    InitializerChange,
    InputChange,
    NodeChange,
    ValueChange,
    diff_models,
    format_report,
    tensor_summary,
)


def attention_model() -> onnx.ModelProto:
    """Scores -> scale -> mask -> Softmax(axis=3) -> MatMul(V) -> Transpose, two outputs."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(np.float32(0.5), "scale"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "values"),
    ]
    nodes = [
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_node"),
        helper.make_node("Add", ["scaled", "mask"], ["masked"], name="mask_node"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=3),
        helper.make_node("MatMul", ["probs", "values"], ["context"], name="context_node"),
        helper.make_node("Transpose", ["context"], ["output"], name="transpose", perm=[0, 2, 1, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, 4, 4]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, 4]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 2, 4]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2, 4, 4]),
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def renamed_and_shuffled(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Every node and intermediate tensor renamed, nodes in random order; the interface kept."""
    out = copy_of(model)
    graph = out.graph
    interface = {v.name for v in [*graph.input, *graph.output]} | {t.name for t in graph.initializer}
    new_names = {}
    for i, node in enumerate(graph.node):
        node.name = f"renamed_{i}"
        new_names.update({name: f"tensor_{i}_{k}" for k, name in enumerate(node.output) if name not in interface})
    for node in graph.node:
        for names in (node.input, node.output):
            names[:] = [new_names.get(name, name) for name in names]
    nodes = list(graph.node)
    random.Random(seed).shuffle(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def only(result, section):
    """The entries of `section`, asserting that no other section changed."""
    others = [s for s in result.SECTIONS if s != section and getattr(result, s)]
    assert not others, f"unexpected changes in {others}: {format_report(result)}"
    return getattr(result, section)


# --- names and order ------------------------------------------------------------------------


def test_renamed_and_shuffled_nodes_diff_as_equal():
    model = attention_model()
    result = diff_models(model, renamed_and_shuffled(model))
    assert result.equal, format_report(result)
    assert format_report(result) == "equal: A and B compute the same graph (5 nodes)"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_renamed_and_shuffled_bert_exports_diff_as_equal(name):
    model = onnx.load(model_path(name))
    result = diff_models(model, renamed_and_shuffled(model, seed=len(name)))
    assert result.equal, format_report(result)


def test_identical_constants_are_interchangeable():
    """TorchScript exports repeat identical Constant nodes; which copy a node reads is no change."""
    model = onnx.load(model_path("bert_qa_torchscript"))
    shuffled = renamed_and_shuffled(model)
    constants = {}
    for node in shuffled.graph.node:
        if node.op_type == "Constant":
            constants.setdefault(node.attribute[0].t.SerializeToString(), []).append(node.output[0])
    # What a CSE pass does: every reader of a duplicate reads the first copy, the others go.
    first = {name: names[0] for names in constants.values() for name in names}
    for node in shuffled.graph.node:
        node.input[:] = [first.get(name, name) for name in node.input]
    kept = [n for n in shuffled.graph.node if n.op_type != "Constant" or first[n.output[0]] == n.output[0]]
    removed = len(shuffled.graph.node) - len(kept)
    assert removed > 0
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(kept)
    changes = only(diff_models(model, shuffled), "nodes")
    # Only the copies are gone; no reader counts as rewired.
    assert {(c.kind, c.op_type) for c in changes} == {("removed", "Constant")}
    assert len(changes) == removed


# --- each kind of change, reported exactly --------------------------------------------------


def test_added_cast_is_one_added_node():
    model = attention_model()
    changed = copy_of(model)
    node_named(changed, "softmax").input[0] = "masked_f32"
    changed.graph.node.insert(2, helper.make_node("Cast", ["masked"], ["masked_f32"], name="cast", to=TensorProto.FLOAT))
    result = diff_models(model, changed)
    assert only(result, "nodes") == [
        NodeChange(
            "added",
            "Cast",
            node_b="cast",
            inputs=("masked",),
            outputs=("masked_f32",),
            attributes=(AttributeChange("to", None, TensorProto.FLOAT),),
        )
    ]
    assert "+ node Cast 'cast' to=1: (masked) -> (masked_f32)" in format_report(result).splitlines()


def test_changed_softmax_axis_is_one_changed_attribute():
    model = attention_model()
    changed = copy_of(model)
    node_named(changed, "softmax").attribute[0].i = 1
    result = diff_models(model, changed)
    assert only(result, "nodes") == [
        NodeChange(
            "changed",
            "Softmax",
            node_a="softmax",
            node_b="softmax",
            inputs=("masked",),
            outputs=("probs",),
            attributes=(AttributeChange("axis", 3, 1),),
        )
    ]
    assert "~ node Softmax 'softmax' -> (probs): attribute axis: 3 -> 1" in format_report(result).splitlines()


def test_changed_initializer_value_is_reported_on_the_initializer_only():
    model = attention_model()
    changed = copy_of(model)
    values = changed.graph.initializer[1]
    new = numpy_helper.to_array(values).copy()
    new[0, 0] += 1
    values.CopyFrom(numpy_helper.from_array(new, "values"))
    result = diff_models(model, changed)
    assert only(result, "initializers") == [
        InitializerChange("changed", "values", tensor_summary(model.graph.initializer[1]), tensor_summary(values), ("value",))
    ]
    old_hash, new_hash = (s.sha256[:12] for s in (tensor_summary(model.graph.initializer[1]), tensor_summary(values)))
    line = f"~ initializer values: value float32[4,4] sha256:{old_hash} -> float32[4,4] sha256:{new_hash}"
    assert line in format_report(result).splitlines()
    assert diff_models(model, changed, ignore=["initializer_values"]).equal


def test_removed_output():
    model = attention_model()
    changed = copy_of(model)
    del changed.graph.output[1]
    result = diff_models(model, changed)
    assert only(result, "outputs") == [ValueChange("removed", "probs", "float32[batch,2,4,4]", None)]
    assert "- output probs: float32[batch,2,4,4]" in format_report(result).splitlines()


def test_changed_input_shape():
    model = attention_model()
    changed = copy_of(model)
    changed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    assert only(diff_models(model, changed), "inputs") == [
        ValueChange("changed", "scores", "float32[batch,2,4,4]", "float32[8,2,4,4]")
    ]


def test_rewired_input_names_both_tensors():
    model = attention_model()
    changed = copy_of(model)
    changed.graph.initializer.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "identity"))
    node_named(changed, "context_node").input[1] = "identity"
    result = diff_models(model, changed)
    assert result.nodes == [
        NodeChange(
            "changed",
            "MatMul",
            node_a="context_node",
            node_b="context_node",
            inputs=("probs", "identity"),
            outputs=("context",),
            rewired=(InputChange(1, "values", "identity"),),
        )
    ]
    assert [(c.kind, c.name) for c in result.initializers] == [("added", "identity")]


def test_removed_subgraph_lists_its_nodes():
    model = attention_model()
    changed = copy_of(model)
    # Feed the mask straight into the Softmax: Mul and Add go.
    del changed.graph.node[:2]
    node_named(changed, "softmax").input[0] = "scores"
    result = diff_models(model, changed)
    changes = only(result, "nodes")
    assert [(c.kind, c.op_type, c.node_a) for c in changes] == [("removed", "Mul", "scale_node"), ("removed", "Add", "mask_node")]
    assert result.summary()["nodes"] == {"a": 5, "b": 3, "added": {}, "removed": {"Add": 1, "Mul": 1}, "changed": {}}


# --- the same changes inside a real export, all at once --------------------------------------


def test_changes_in_a_bert_export_do_not_spill_downstream():
    model = onnx.load(model_path("bert_qa_torchscript"))
    changed = renamed_and_shuffled(model)
    softmaxes = sorted((n for n in changed.graph.node if n.op_type == "Softmax"), key=lambda n: n.input[0])
    softmaxes[0].attribute[0].i = 1
    cast = helper.make_node("Cast", [softmaxes[1].input[0]], ["scores_f32"], name="inserted", to=TensorProto.FLOAT)
    softmaxes[1].input[0] = "scores_f32"
    changed.graph.node.append(cast)
    bias = next(t for t in changed.graph.initializer if t.name.endswith("layer.1.output.dense.bias"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1, bias.name))
    del changed.graph.output[1]
    result = diff_models(model, changed)
    kinds = [(c.kind, c.op_type, tuple(a.name for a in c.attributes)) for c in result.nodes]
    assert kinds == [("added", "Cast", ("to",)), ("changed", "Softmax", ("axis",))]
    assert result.nodes[1].attributes == (AttributeChange("axis", -1, 1),)
    assert [(c.kind, c.name, c.aspects) for c in result.initializers] == [
        ("changed", "model.bert.encoder.layer.1.output.dense.bias", ("value",))
    ]
    assert result.outputs == [ValueChange("removed", "end_logits", "float32[batch,sequence]", None)]
    assert not (result.inputs or result.opsets or result.metadata or result.doc_strings or result.functions)


# --- model-level fields, ignore options, JSON, errors ----------------------------------------


def test_opsets_metadata_and_doc_strings():
    model = attention_model()
    changed = copy_of(model)
    changed.opset_import[0].version = 18
    changed.opset_import.append(helper.make_opsetid("ai.graphcore", 1))
    helper.set_model_props(changed, {"poprt_lite.precision": "fp16"})
    changed.doc_string = "converted"
    result = diff_models(model, changed)
    assert result.opsets == [FieldChange("added", "ai.graphcore", None, 1), FieldChange("changed", "ai.onnx", 17, 18)]
    assert result.metadata == [FieldChange("added", "poprt_lite.precision", None, "fp16")]
    assert result.doc_strings == [FieldChange("changed", "model", "", "converted")]
    relaxed = diff_models(model, changed, ignore=["metadata", "doc_strings"])
    assert not relaxed.metadata and not relaxed.doc_strings and relaxed.opsets


def test_json_report():
    model = attention_model()
    changed = copy_of(model)
    node_named(changed, "softmax").attribute[0].i = 1
    report = json.loads(diff_models(model, changed, labels=("old.onnx", "new.onnx")).to_json())
    assert report["equal"] is False
    assert (report["a"], report["b"]) == ("old.onnx", "new.onnx")
    assert report["summary"]["nodes"]["changed"] == {"Softmax": 1}
    assert report["nodes"][0]["attributes"] == [{"name": "axis", "old": 3, "new": 1}]


def test_unknown_ignore_is_refused():
    with pytest.raises(PoprtError, match="^ignore takes initializer_values, doc_strings, metadata; got 'weights'"):
        diff_models(attention_model(), attention_model(), ignore=["weights"])


def test_a_cycle_is_an_error():
    model = attention_model()
    node_named(model, "scale_node").input[0] = "output"  # output -> ... -> scale_node -> ... -> output
    with pytest.raises(PoprtError, match="cycle"):
        diff_models(model, attention_model(), labels=("cyclic.onnx", "B"))


# --- BERT-base size ---------------------------------------------------------------------------


def bert_base_like(seed: int = 0, layers: int = 12, hidden: int = 768, heads: int = 12, ff: int = 3072, vocab: int = 30522) -> onnx.ModelProto:
    """A BERT-base-size encoder (~110M random parameters) laid out like a TorchScript export:
    scalars as Constant nodes, a Shape/Gather/Unsqueeze/Concat chain per head reshape."""
    rng = np.random.default_rng(seed)
    initializers, nodes = [], []

    def weight(name, *shape):
        initializers.append(numpy_helper.from_array(rng.random(shape, dtype=np.float32), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_node", **attrs))
        return output

    def const(name, value):
        return node("Constant", [], name, value=numpy_helper.from_array(np.asarray(value)))

    def heads_shape(x, p):
        shape = node("Shape", [x], f"{p}_shape")
        dims = [
            node("Unsqueeze", [node("Gather", [shape, const(f"{p}_i{i}", np.int64(i))], f"{p}_dim{i}"), const(f"{p}_a{i}", [0])], f"{p}_u{i}")
            for i in (0, 1)
        ]
        return node("Concat", [*dims, const(f"{p}_h", [heads]), const(f"{p}_d", [hidden // heads])], f"{p}_hshape", axis=0)

    x = node("Gather", [weight("word", vocab, hidden), "input_ids"], "word_emb")
    x = node("Add", [x, node("Gather", [weight("type", 2, hidden), "token_type_ids"], "type_emb")], "emb_sum")
    length = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), const("c1", np.int64(1))], "seq")
    positions = node("Unsqueeze", [node("Range", [const("c0", np.int64(0)), length, const("cs", np.int64(1))], "range"), const("ca", [0])], "pos_ids")
    x = node("Add", [x, node("Gather", [weight("pos", 512, hidden), positions], "pos_emb")], "emb")
    x = node("LayerNormalization", [x, weight("emb_ln_w", hidden), weight("emb_ln_b", hidden)], "emb_ln", axis=-1, epsilon=1e-12)
    mask4 = node("Unsqueeze", ["attention_mask", const("m_axes", [1, 2])], "mask4")
    inverted = node("Sub", [const("one_f", np.float32(1)), node("Cast", [mask4], "maskf", to=TensorProto.FLOAT)], "inv")
    mask = node("Mul", [inverted, const("neg", np.float32(-1e4))], "mask_bias")
    for layer in range(layers):
        p = f"l{layer}_"

        def linear(name, src, n_in=hidden, n_out=hidden):
            return node("Add", [node("MatMul", [src, weight(p + name + "_w", n_in, n_out)], p + name + "_mm"), weight(p + name + "_b", n_out)], p + name)

        q, k, v = (
            node("Transpose", [node("Reshape", [linear(n, x), heads_shape(x, p + n)], p + n + "_r")], p + n + "_t", perm=perm)
            for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3]))
        )
        scores = node("Mul", [node("MatMul", [q, k], p + "qk"), const(p + "scale", np.float32((hidden // heads) ** -0.5))], p + "scaled")
        probs = node("Softmax", [node("Add", [scores, mask], p + "masked")], p + "probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], p + "ctx")], p + "ctx_t", perm=[0, 2, 1, 3])
        flat = node("Concat", [p + "q_u0", p + "q_u1", const(p + "m1", [-1])], p + "flat", axis=0)
        context = node("Reshape", [context, flat], p + "ctx_r")
        x = node("LayerNormalization", [node("Add", [linear("o", context), x], p + "res1"), weight(p + "ln1_w", hidden), weight(p + "ln1_b", hidden)], p + "ln1", axis=-1, epsilon=1e-12)
        h = linear("ff1", x, hidden, ff)
        erf = node("Erf", [node("Div", [h, const(p + "sqrt2", np.float32(2**0.5))], p + "div")], p + "erf")
        gelu = node("Mul", [node("Mul", [h, node("Add", [erf, const(p + "one", np.float32(1))], p + "erf1")], p + "gx"), const(p + "half", np.float32(0.5))], p + "gelu")
        x = node("LayerNormalization", [node("Add", [linear("ff2", gelu, ff, hidden), x], p + "res2"), weight(p + "ln2_w", hidden), weight(p + "ln2_b", hidden)], p + "ln2", axis=-1, epsilon=1e-12)
    nodes[-1].output[0] = "last_hidden_state"
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    return helper.make_model(helper.make_graph(nodes, "bert_base_like", ids, [output], initializers), opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow
def test_bert_base_size_diff_takes_seconds():
    """The bound is on this process's CPU time, which other processes' load does not stretch: 10 s is
    over 10x the 0.9 s measured."""
    model = bert_base_like()
    assert len(model.graph.node) > 900
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) > 100_000_000
    changed = renamed_and_shuffled(model)
    next(n for n in changed.graph.node if n.op_type == "Softmax").attribute[0].i = 1
    start = time.process_time()
    result = diff_models(model, changed)
    seconds = time.process_time() - start
    assert [(c.kind, c.op_type) for c in result.nodes] == [("changed", "Softmax")]
    assert seconds < 10, f"diff took {seconds:.1f} s"
