"""Attention blocks and their score terms, found by structure (poprt_lite/patterns/attention.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import model_path
from poprt_lite import ir
from poprt_lite.errors import PoprtError
from poprt_lite.patterns import mask_terms
from poprt_lite.patterns.attention import (
    KEY_HEADS,
    QUERY_HEADS,
    find_attention_blocks,
    is_constant,
    relative_position_sources,
    token_content,
    token_view_of_context,
    token_view_source,
)

HIDDEN, VOCAB, POSITIONS, SPAN = 8, 50, 64, 7


def score_term_model(term: str) -> onnx.ModelProto:
    """A one-layer, one-head encoder whose scores get `term` before Softmax:

    - "relative": a learned bias per clipped relative position j - i (T5 / MPNet style), then the mask;
    - "combined": that bias and the padding mask summed first, then added once (T5's encoder);
    - "absolute": a learned bias per absolute key position j (not shift-invariant), then the mask.
    The sequence length comes from Shape(x), as exporters write it.
    """
    rng = np.random.default_rng(3)

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    inits: list[onnx.TensorProto] = []
    f32 = np.float32
    init("word_table", rng.standard_normal((VOCAB, HIDDEN)).astype(f32))
    init("pos_table", rng.standard_normal((POSITIONS, HIDDEN)).astype(f32))
    for name in ("wq", "wk", "wv", "wo"):
        init(name, (rng.standard_normal((HIDDEN, HIDDEN)) / 2).astype(f32))
    init("ax1", np.array([1], np.int64))
    init("ax0", np.array([0], np.int64))
    init("ax12", np.array([1, 2], np.int64))
    init("ax01", np.array([0, 1], np.int64))
    init("zero", np.array(0, np.int64))
    init("one", np.array(1, np.int64))
    init("onef", np.array(1.0, f32))
    init("neg", np.array(-10000.0, f32))
    init("lo", np.array(-SPAN, np.int64))
    init("hi", np.array(SPAN, np.int64))
    init("rel_table", rng.standard_normal(2 * SPAN + 1).astype(f32))
    init("key_table", (rng.standard_normal(POSITIONS) * 2).astype(f32))
    node = helper.make_node
    nodes = [
        node("Gather", ["word_table", "input_ids"], ["words"]),
        node("Gather", ["pos_table", "position_ids"], ["positions"]),
        node("Add", ["words", "positions"], ["x"]),
        node("MatMul", ["x", "wq"], ["q3"]),
        node("MatMul", ["x", "wk"], ["k3"]),
        node("MatMul", ["x", "wv"], ["v3"]),
        node("Unsqueeze", ["q3", "ax1"], ["q"]),
        node("Unsqueeze", ["k3", "ax1"], ["k"]),
        node("Unsqueeze", ["v3", "ax1"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["mask_f", "ax12"], ["mask4"]),
        node("Sub", ["onef", "mask4"], ["inverted"]),
        node("Mul", ["inverted", "neg"], ["mask_bias"]),
        node("Shape", ["x"], ["x_shape"]),
        node("Gather", ["x_shape", "one"], ["seq"]),
        node("Range", ["zero", "seq", "one"], ["pos"], name="row_positions"),
    ]
    if term == "absolute":
        nodes += [
            node("Gather", ["key_table", "pos"], ["key_bias"]),  # [S]
            node("Unsqueeze", ["key_bias", "ax01"], ["bias"]),  # [1, 1, S] -> broadcast over queries
        ]
    else:
        nodes += [
            node("Unsqueeze", ["pos", "ax0"], ["key_pos"]),
            node("Unsqueeze", ["pos", "ax1"], ["query_pos"]),
            node("Sub", ["key_pos", "query_pos"], ["rel"], name="relative_positions"),
            node("Clip", ["rel", "lo", "hi"], ["clipped"]),
            node("Add", ["clipped", "hi"], ["bucket"]),
            node("Gather", ["rel_table", "bucket"], ["rel_bias"]),  # [S, S]
            node("Unsqueeze", ["rel_bias", "ax01"], ["bias"]),  # [1, 1, S, S]
        ]
    if term == "combined":
        nodes += [
            node("Add", ["bias", "mask_bias"], ["position_bias"]),
            node("Add", ["scores", "position_bias"], ["masked"], name="add_position_bias"),
        ]
    else:
        nodes += [
            node("Add", ["scores", "bias"], ["biased"], name="add_bias"),
            node("Add", ["biased", "mask_bias"], ["masked"], name="add_mask"),
        ]
    nodes += [
        node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        node("MatMul", ["probs", "v"], ["context"], name="context"),
        node("Squeeze", ["context", "ax1"], ["merged"]),
        node("MatMul", ["merged", "wo"], ["hidden"]),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask", "position_ids")]
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", HIDDEN])
    graph = helper.make_graph(nodes, f"score_term_{term}", ids, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def blocks_of(model: onnx.ModelProto, longest: int = 16):
    """The attention blocks, with their padding masks proven on requests of up to `longest` tokens."""
    graph = ir.to_graph(model)
    ir.infer_shapes_in_place(graph)
    blocks = find_attention_blocks(graph, ["attention_mask"], ["input_ids"])
    inputs = {t.name: t for t in graph.inputs}
    content = token_content(graph, ["input_ids"])
    mask_terms.prove_padding_masks(graph, blocks, inputs.get("attention_mask"), tuple(inputs["input_ids"].shape[:2]), longest, content)
    return graph, blocks


@pytest.mark.parametrize("name", ["bert_qa_torchscript", "bert_qa_dynamo", "roberta_qa", "distilbert_qa", "xlmr_sdpa", "xlmr_sdpa_dynamo"])
def test_padding_mask_is_the_only_term_of_bert_like_exports(name):
    _, blocks = blocks_of(ir.load_model(model_path(name)))
    assert len(blocks) == 2
    for block in blocks:
        assert block.masked and not block.biases
        assert [len(t.masks) for t in block.terms] == [1] and not block.where_masks


@pytest.mark.parametrize("name", ["mpnet_qa", "mpnet_qa_dynamo"])
def test_mpnet_relative_position_bias_is_a_relative_bias_shared_by_the_layers(name):
    graph, blocks = blocks_of(ir.load_model(model_path(name)))
    assert len(blocks) == 2
    assert [len(b.biases) for b in blocks] == [1, 1] and blocks[0].biases[0] is blocks[1].biases[0]
    assert all(b.masked for b in blocks)
    content = token_content(graph, ["input_ids"])
    assert relative_position_sources(blocks[0].biases[0], content) == []


@pytest.mark.parametrize("name", ["deberta_v2_qa", "deberta_v2_cls", "deberta_v2_cls_dynamo"])
def test_deberta_disentangled_attention_c2p_p2c_and_masked_fill(name):
    graph, blocks = blocks_of(ir.load_model(model_path(name)))
    assert len(blocks) == 2
    content = token_content(graph, ["input_ids"])
    for block in blocks:
        assert len(block.where_masks) == 1  # masked_fill(~mask, finfo.min)
        # c2p / scale and p2c / scale (TorchScript also keeps the `score = 0` they are added to)
        assert len([b for b in block.biases if not is_constant(b)]) == 2
        assert not any(t.masks for t in block.terms)
        assert "Reshape" in [n.op for n in block.path]  # [B*H, S, S] viewed as [B, H, S, S]
        for bias in block.biases:
            assert relative_position_sources(bias, content) == []
        assert block.query.shape is not None and len(block.query.shape) == 3  # [batch*heads, seq, head_dim]


def test_relative_bias_then_mask():
    graph, (block,) = blocks_of(score_term_model("relative"))
    assert [(t.node.name, len(t.summands), len(t.masks)) for t in block.terms] == [("add_mask", 1, 1), ("add_bias", 1, 0)]
    assert [b.name for b in block.biases] == ["bias"]
    assert relative_position_sources(block.biases[0], token_content(graph, ["input_ids"])) == []


def test_bias_summed_with_the_mask_is_taken_apart():
    graph, (block,) = blocks_of(score_term_model("combined"))
    (term,) = block.terms
    assert term.node.name == "add_position_bias"
    assert sorted(t.name for t in term.summands) == ["bias", "mask_bias"]
    assert [t.name for t in term.masks] == ["mask_bias"] and [t.name for t in block.biases] == ["bias"]


def test_absolute_position_bias_names_its_range():
    graph, (block,) = blocks_of(score_term_model("absolute"))
    (bias,) = block.biases
    assert [n.name for n in relative_position_sources(bias, token_content(graph, ["input_ids"]))] == ["row_positions"]


def test_without_mask_inputs_no_summand_is_a_mask():
    graph = ir.to_graph(score_term_model("relative"))
    (block,) = find_attention_blocks(graph)
    assert not block.masked and len(block.biases) == 2


def test_scores_of_rank_3_are_refused_naming_the_softmax():
    """The new mask is [batch, 1, seq, seq]: a Softmax over [batch*heads, seq, seq] scores cannot take it."""
    graph, _ = blocks_of(score_term_model("relative"))
    softmax = next(n for n in graph.nodes if n.name == "softmax")
    softmax.inputs[0].shape = ["batch", "seq", "seq"]
    with pytest.raises(PoprtError, match=r"^attention at Softmax 'softmax' works on rank-3 scores; packing supports \[batch, heads, seq, seq\] scores$"):
        find_attention_blocks(graph, ["attention_mask"])


# ------------------------------------------------------------------ per-token views of the heads

B, S, NH, D = 2, 3, 2, 4  # batch, seq, heads, head_dim of the view chains below


def view_chain(*steps: tuple) -> tuple[gs.Variable, gs.Variable]:
    """A per-token tensor x [B, S, NH*D] through `steps`: ("reshape", shape), ("transpose", perm),
    ("mul", factor), ("div", factor); returns (x, the last tensor)."""
    x = gs.Variable("x", np.float32, [B, S, NH * D])
    tensor = x
    for k, (op, arg) in enumerate(steps):
        if op == "reshape":
            shape = [tensor.shape[i] if v == 0 else v for i, v in enumerate(arg)]
            shape = list(np.empty(tensor.shape).reshape(shape).shape)
            node = gs.Node("Reshape", inputs=[tensor, gs.Constant(f"shape{k}", np.array(arg, np.int64))])
        elif op == "transpose":
            shape = [tensor.shape[p] for p in arg]
            node = gs.Node("Transpose", attrs={"perm": list(arg)}, inputs=[tensor])
        else:
            shape = tensor.shape
            node = gs.Node(op.capitalize(), inputs=[tensor, gs.Constant(f"factor{k}", np.array(arg, np.float32))])
        tensor = gs.Variable(f"t{k}", np.float32, shape)
        node.outputs = [tensor]
    return x, tensor


@pytest.mark.parametrize(
    "steps, perm, scale",
    [
        ([("reshape", [B, S, NH, D]), ("transpose", QUERY_HEADS)], QUERY_HEADS, 1.0),
        ([("reshape", [0, 0, NH, D]), ("transpose", KEY_HEADS), ("mul", 0.5)], KEY_HEADS, 0.5),
        # dynamo's K^T: heads, [B*H, S, D], transposed, back to [B, H, D, S], scaled; scaled Q by a Div
        ([("reshape", [B, S, NH, D]), ("transpose", QUERY_HEADS), ("reshape", [B * NH, S, D]), ("transpose", [0, 2, 1]),
          ("reshape", [B, NH, D, S]), ("mul", 0.5)], KEY_HEADS, 0.5),
        ([("reshape", [B, S, NH, D]), ("div", 4.0), ("transpose", QUERY_HEADS), ("mul", 2.0)], QUERY_HEADS, 0.5),
    ],
)  # fmt: skip
def test_heads_views_lead_back_to_the_per_token_tensor(steps, perm, scale):
    x, heads = view_chain(*steps)
    view = token_view_source(heads, B, S, NH, perm)
    assert view is not None and view.source is x and view.scale == pytest.approx(scale)


@pytest.mark.parametrize(
    "steps, perm",
    [
        ([("reshape", [B, S, D, NH]), ("transpose", [0, 3, 1, 2])], QUERY_HEADS),  # heads taken as the inner axis
        ([("reshape", [B, S, NH, D]), ("transpose", QUERY_HEADS)], KEY_HEADS),  # Q's layout where K^T's is wanted
        ([("reshape", [B, S, NH, D]), ("transpose", [0, 2, 1, 3]), ("transpose", [1, 0, 2, 3])], QUERY_HEADS),  # rows and heads swapped
    ],
)  # fmt: skip
def test_other_views_of_the_same_shape_are_not_heads(steps, perm):
    _, heads = view_chain(*steps)
    assert token_view_source(heads, B, S, NH, perm) is None


def test_a_scaled_value_is_not_a_plain_view():
    x, value = view_chain(("reshape", [B, S, NH, D]), ("transpose", QUERY_HEADS), ("mul", 2.0))
    assert token_view_source(value, B, S, NH, QUERY_HEADS).source is x
    assert token_view_source(value, B, S, NH, QUERY_HEADS, scaled=False) is None


def test_the_context_goes_back_to_tokens_only_by_the_inverse_view():
    context = gs.Variable("context", np.float32, [B, NH, S, D])
    t = gs.Variable("t", np.float32, [B, S, NH, D])
    merged = gs.Variable("merged", np.float32, [B, S, NH * D])
    transpose = gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[context], outputs=[t])
    gs.Node("Reshape", inputs=[t, gs.Constant("merged_shape", np.array([B, S, NH * D], np.int64))], outputs=[merged])
    assert token_view_of_context(context, B, S, NH) is merged
    transpose.attrs["perm"] = [0, 2, 3, 1]  # [B, S, D, NH]: the same shape, heads as the inner axis
    t.shape = [B, S, D, NH]
    assert token_view_of_context(context, B, S, NH) is None
