"""Sentence-embedding heads pack in every mode: each request's pooled (and normalized) row equals
the original model's run on that request alone, unpadded."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings

from conftest import VOCAB, model_path
from poprt_lite import compile, ir, ops, vocab
from poprt_lite.compiler import verify
from poprt_lite.errors import PassError
from poprt_lite.runtime import modes as pack_modes
from poprt_lite.ops.segment_pool import FIRST, LAST, MAX, MEAN, MEAN_SQRT_LEN, WEIGHTED_MEAN
from poprt_lite.vocab import Layout

from .test_pack_passes import BATCH, MODES, SEQ, STATIC_MODES, STREAM, N, L, lengths_strategy, pack_options, packed, run_packed

SENTENCE_MODELS = [
    "st_mean_norm_torchscript",
    "st_mean_norm_dynamo",
    "st_cls_norm_torchscript",
    "st_max_torchscript",
    "st_card_mean_echo",
    "pooling_variants",
    "bert_meanpool",
    "st_mean_sqrt_len_torchscript",
    "st_weightedmean_torchscript",
    "st_lasttoken_torchscript",
    "st_multi_pool_dynamo",
]
# Pooled outputs and the SegmentPool mode of their head (modes: heads concatenated).
POOLED = {
    "st_mean_norm_torchscript": {"sentence_embedding": MEAN},
    "st_mean_norm_dynamo": {"sentence_embedding": MEAN},
    "st_cls_norm_torchscript": {"sentence_embedding": FIRST},
    "st_max_torchscript": {"sentence_embedding": MAX},
    "st_card_mean_echo": {"sentence_embedding": MEAN},
    "pooling_variants": {"cls_gather_sqrt_norm": FIRST, "cls_slice": FIRST, "mean_reducemean": MEAN, "mean_unmasked": MEAN, "max_where": MAX},
    "bert_meanpool": {"pooled": MEAN},
    "st_mean_sqrt_len_torchscript": {"sentence_embedding": MEAN_SQRT_LEN},
    "st_weightedmean_torchscript": {"sentence_embedding": WEIGHTED_MEAN},
    "st_lasttoken_torchscript": {"sentence_embedding": LAST},
    "st_multi_pool_dynamo": {"sentence_embedding": (MEAN, MEAN_SQRT_LEN, WEIGHTED_MEAN, LAST)},  # one head per mode, concatenated
}


def assert_equal_per_request(results):
    for want, got in results:
        assert len(want) == len(got)
        for w, g in zip(want, got, strict=True):
            assert w.shape == g.shape
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SENTENCE_MODELS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_strategy)
def test_pooled_outputs_equal_original_per_request(name, mode, lengths):
    batch, results = run_packed(name, mode, lengths)
    assert len(results) == batch.count >= 1
    assert_equal_per_request(results)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SENTENCE_MODELS)
def test_layouts_shapes_and_ops(name, mode):
    model = packed(name, mode)
    meta = ir.get_metadata(model)
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    kind = mode if pack_modes.get(mode).static else STREAM  # token_stream_loop lays out its batches as token_stream
    token_layout = {"unpack_repack": Layout.unpacked, "attention_mask": Layout.packed, STREAM: Layout.stream}[kind]
    token_shape = {"unpack_repack": [N, L], "attention_mask": [BATCH, SEQ], STREAM: [1, 0]}[kind]  # 0: symbolic
    slots = 0 if kind == STREAM else N
    for output, shape in outputs.items():
        if output in POOLED[name]:
            assert vocab.layout_of(meta, output) is Layout.per_request
            width = 64 * len(np.atleast_1d(POOLED[name][output]))
            assert shape == ([slots, 1, 64] if output == "cls_slice" else [slots, width])
        else:
            assert vocab.layout_of(meta, output) is token_layout
            assert shape[:2] == token_shape
    pools = [n for n in model.graph.node if n.op_type == "SegmentPool"]
    if mode == "attention_mask":
        modes = sorted(onnx.helper.get_attribute_value(a) for n in pools for a in n.attribute if a.name == "mode")
        assert modes == sorted(np.hstack(list(POOLED[name].values())).tolist())
        assert all(n.input[1] == "attention_mask" and n.domain == ops.DOMAIN for n in pools)
    else:
        assert not pools
    # every reduction left reads one row per request slot ([N, ...]), none a packed [B, S, ...] tensor
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    for node in [n for n in model.graph.node if n.op_type.startswith("Reduce")]:
        assert shapes[node.input[0]][0] == (N if kind != STREAM else "requests"), (node.name, shapes[node.input[0]])


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_first_fit_puts_a_later_request_in_an_earlier_row(mode):
    """Slot order is the order of the requests' first tokens: with first_fit, request 2 lands in
    row 0 before request 1 (row 1), and each still gets its own pooled row."""
    from poprt_lite.runtime import packing_utils
    from types import SimpleNamespace

    model = packed("st_mean_norm_torchscript", mode)
    rng = np.random.default_rng(3)
    requests = verify.make_requests(rng, [10, 12, 5, 16], VOCAB)
    dataset = [SimpleNamespace(input_ids=r["input_ids"][0], token_type_ids=r["token_type_ids"][0], input_len=r["input_ids"].shape[1]) for r in requests]
    batch = packing_utils.pack_data(dataset, 0, BATCH, SEQ, N, across_rows=mode == "unpack_repack", algorithm="first_fit", segment_max_size=L)
    if mode == "attention_mask":
        assert [(s.index, s.row) for s in batch.specs] == [(0, 0), (1, 1), (2, 0), (3, 2)]
    feeds = {i.name: batch.data[i.name] if i.name != "unpack_info" else batch.unpack_info for i in model.graph.input}
    feeds = {k: v.astype(np.int64) if k != "unpack_info" else v for k, v in feeds.items()}
    session = verify.session(model)
    token_embeddings, sentence_embedding = session.run(None, feeds)
    pooled = packing_utils.unpack_outputs(batch, sentence_embedding, mode == "unpack_repack", Layout.per_request)
    tokens = packing_utils.unpack_outputs(batch, token_embeddings, mode == "unpack_repack")
    original = verify.session(ir.load_model(model_path("st_mean_norm_torchscript")))
    for spec, p, t in zip(batch.specs, pooled, tokens, strict=True):
        want_tokens, want = original.run(None, requests[spec.index])
        np.testing.assert_allclose(p, want[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(t, want_tokens[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------- variants built by editing


def edited(name: str, edit) -> onnx.ModelProto:
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(ir.load_model(model_path(name))))
    edit(graph)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


@functools.cache
def edited_model(variant: str) -> onnx.ModelProto:
    def lp_normalization(graph):
        """st_mean_norm_torchscript with F.normalize written as one LpNormalization."""
        out = next(t for t in graph.outputs if t.name == "sentence_embedding")
        div = out.inputs[0]
        div.outputs.clear()
        graph.nodes.append(gs.Node("LpNormalization", inputs=[div.inputs[0]], outputs=[out], attrs={"p": 2, "axis": -1}))

    def sum_pooling(graph):
        """bert_meanpool's pooled output as the masked sum (no division): a head no pattern knows."""
        out = next(t for t in graph.outputs if t.name == "pooled")
        div = out.inputs[0]
        div.outputs.clear()
        graph.nodes.append(gs.Node("Identity", inputs=[div.inputs[0]], outputs=[out]))

    def centered(graph):
        """An extra output: the token embeddings minus their request's mean (pooled rows meet tokens)."""
        tokens = next(t for t in graph.outputs if t.name == "last_hidden_state")
        pooled = next(t for t in graph.outputs if t.name == "pooled")
        kept = gs.Variable("pooled_kept", dtype=np.float32)
        graph.nodes.append(gs.Node("Unsqueeze", "keep_axis", inputs=[pooled, gs.Constant("axis_1", np.array([1]))], outputs=[kept]))
        centered = gs.Variable("centered", dtype=np.float32, shape=tokens.shape)
        graph.nodes.append(gs.Node("Sub", "center", inputs=[tokens, kept], outputs=[centered]))
        graph.outputs.append(centered)

    def similarity(graph):
        """An extra output: the pooled rows' similarity matrix, pooled @ pooled^T (mixes requests)."""
        pooled = next(t for t in graph.outputs if t.name == "pooled")
        flipped = gs.Variable("pooled_t", dtype=np.float32)
        graph.nodes.append(gs.Node("Transpose", "flip", inputs=[pooled], outputs=[flipped], attrs={"perm": [1, 0]}))
        scores = gs.Variable("scores", dtype=np.float32, shape=["batch", "batch"])
        graph.nodes.append(gs.Node("MatMul", "similarity", inputs=[pooled, flipped], outputs=[scores]))
        graph.outputs.append(scores)

    def weights_from_zero(graph):
        """st_weightedmean_torchscript with its positions counted from 0: a weighting no pattern
        knows, whose weights come from the padded batch's length."""
        (positions,) = [n for n in graph.nodes if n.op == "Range" and n.name.startswith("/pooling/")]
        positions.inputs[0] = gs.Constant("start_0", np.array(0, np.float32))

    name, edit = {
        "weights_from_zero": ("st_weightedmean_torchscript", weights_from_zero),
        "lp_normalization": ("st_mean_norm_torchscript", lp_normalization),
        "sum_pooling": ("bert_meanpool", sum_pooling),
        "centered": ("bert_meanpool", centered),
        "similarity": ("bert_meanpool", similarity),
    }[variant]
    return edited(name, edit)


def compile_edited(variant: str, mode: str, tmp_path) -> onnx.ModelProto:
    path = tmp_path / f"{variant}.onnx"
    onnx.save(edited_model(variant), path)
    return compile(path, save=False, options=pack_options(edited_model(variant), mode)).model


def check_edited(variant: str, model: onnx.ModelProto, lengths=(16, 3, 9, 1, 10)) -> None:
    requests = verify.make_requests(np.random.default_rng(1), list(lengths), VOCAB)
    batch, per_request = verify.run_packed(model, requests)
    original = verify.session(edited_model(variant))
    names = {i.name for i in original.get_inputs()}
    assert batch.count == len(lengths)
    assert_equal_per_request(
        ([o[0] for o in original.run(None, {k: v for k, v in requests[s.index].items() if k in names})], got)
        for s, got in zip(batch.specs, per_request, strict=True)
    )


@pytest.mark.parametrize("mode", MODES)
def test_lp_normalization(mode, tmp_path):
    model = compile_edited("lp_normalization", mode, tmp_path)
    assert [n.op_type for n in model.graph.node].count("LpNormalization") == 1
    check_edited("lp_normalization", model)


@pytest.mark.parametrize("mode", ["unpack_repack", STREAM])
def test_unrecognized_pooling_runs_on_unpacked_rows(mode, tmp_path):
    for variant in ("sum_pooling", "centered"):
        model = compile_edited(variant, mode, tmp_path)
        check_edited(variant, model)


@pytest.mark.parametrize(
    "variant, node, op, why",
    [
        ("sum_pooling", "/ReduceSum(_1)?", "ReduceSum", "mixes the tokens of a packed row"),
        ("centered", "center", "Sub", "combines a per-request value with per-token values"),
    ],
)
def test_attention_mask_mode_refuses_what_it_cannot_place(variant, node, op, why, tmp_path):
    with pytest.raises(PassError, match=rf"^pass 'attention_mask_packing' failed: attention_mask packing cannot keep node '{node}' \({op}\) per request: it {why}; use mode=unpack_repack$"):
        compile_edited(variant, "attention_mask", tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_an_op_moving_the_request_axis_is_refused(mode, tmp_path):
    if mode != "attention_mask":
        pass_name = pack_modes.get(mode).pass_name
        message = rf"^pass '{pass_name}' failed: {mode} cannot place node 'flip' \(Transpose\) after the encoder on per-request rows: it does not keep one row per request; remove it from the model$"
    else:
        message = r"^pass 'attention_mask_packing' failed: attention_mask packing cannot keep node 'flip' \(Transpose\) per request: it does not keep one row per request; use mode=unpack_repack$"
    with pytest.raises(PassError, match=message):
        compile_edited("similarity", mode, tmp_path)


@pytest.mark.parametrize(
    "mode, message",
    [
        ("unpack_repack", "pass 'pack_unpack_repack' failed: unpack_repack cannot place node '/pooling/Reshape_1' (Reshape) after the encoder on per-request rows: it does not keep one row per request; remove it from the model"),
        ("attention_mask", "pass 'attention_mask_packing' failed: attention_mask packing cannot keep node '/pooling/ArgMax' (ArgMax) per request: it mixes the tokens of a packed row; use mode=unpack_repack"),
        (STREAM, "pass 'token_stream_packing' failed: token_stream cannot place node '/pooling/Reshape_1' (Reshape) after the encoder on per-request rows: it does not keep one row per request; remove it from the model"),
    ],
)
def test_an_unknown_weighting_is_refused_naming_the_node(mode, message, tmp_path):
    with pytest.raises(PassError) as err:
        compile_edited("weights_from_zero", mode, tmp_path)
    assert str(err.value) == message
