"""Packing encoders whose attention adds terms to the scores before Softmax (issue 12.2): MPNet's
relative-position bias, DeBERTa-v2's disentangled attention (c2p + p2c, log-bucketed relative
positions, no absolute positions), and XLM-R with sdpa attention. Every request's outputs equal the
original model's on that request alone, unpadded, wherever the request lands in the packed batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings

from passes.test_pack_passes import BATCH, L, N, SEQ, lengths_strategy, packed, run_packed
from patterns.test_attention import score_term_model
from poprt_lite import compile, ir
from poprt_lite.compiler import verify
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import PassError
from poprt_lite.vocab import Layout, PackMode

MODES = [PackMode.unpack_repack.value, PackMode.attention_mask.value]
TOKEN_MODELS = ["mpnet_qa", "mpnet_qa_dynamo", "deberta_v2_qa", "xlmr_sdpa", "xlmr_sdpa_dynamo"]
H = 4  # heads of the tiny models


def assert_equal_per_request(results):
    assert results
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", [*MODES, PackMode.token_stream.value])
@pytest.mark.parametrize("name", TOKEN_MODELS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_strategy)
def test_packed_outputs_equal_original_per_request(name, mode, lengths):
    _, results = run_packed(name, mode, lengths)
    assert_equal_per_request(results)


@pytest.mark.parametrize("mode", [*MODES, PackMode.token_stream.value])
@pytest.mark.parametrize("name", ["deberta_v2_cls", "deberta_v2_cls_dynamo"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_strategy)
def test_deberta_sequence_classification(name, mode, lengths):
    """DeBERTa-v2 sequence classification, pooled on the first token, packs with no hand edit (the
    first-token pooling is placed per request by the pooling heads of issue 12.1)."""
    _, results = run_packed(name, mode, lengths)
    assert_equal_per_request(results)


@pytest.mark.parametrize("mode", MODES)
def test_deberta_classifier_logits_are_per_request(mode):
    model = packed("deberta_v2_cls", mode)
    assert ir.get_metadata(model)["layout.logits"] == Layout.per_request
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [N, 3]


def _outputs_of(model: onnx.ModelProto, op: str) -> list[list[int]]:
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    return [shapes.get(n.output[0]) for n in model.graph.node if n.op_type == op]


def _bias_added_before_softmax(model: onnx.ModelProto) -> list[np.ndarray]:
    """The constant 4-D operands of the Adds on the score paths (static shapes fold the bias)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[x] for n in model.graph.node if n.op_type == "Add" for x in n.input if x in inits and inits[x].ndim == 4]


@pytest.mark.parametrize("mode, rows", [(PackMode.unpack_repack.value, (N, L)), (PackMode.attention_mask.value, (BATCH, SEQ))])
def test_mpnet_bias_depends_on_relative_positions_only(mode, rows):
    """Once shapes are static the bias folds into one constant shared by both layers: on request
    rows (unpack_repack, each request's positions from 0) or on packed rows (AttentionMask, where it
    is right for the pairs of one request because it depends on j - i only)."""
    biases = _bias_added_before_softmax(packed("mpnet_qa", mode))
    assert len(biases) == 2 and biases[0] is biases[1]  # one initializer read by both layers
    bias = biases[0]
    assert bias.shape == (rows[0], H, rows[1], rows[1])
    assert np.array_equal(bias, np.broadcast_to(bias[:1], bias.shape))  # the same for every row
    i, j = np.indices(bias.shape[2:])
    for offset in range(-rows[1] + 1, rows[1]):
        diagonal = bias[0][:, j - i == offset]
        assert np.array_equal(diagonal, np.broadcast_to(diagonal[:, :1], diagonal.shape))
    assert len({float(v) for v in bias[0, 0, 0]}) > 8  # buckets differ: the check above means something


def test_deberta_disentangled_terms_on_request_rows_in_unpack_repack_mode():
    """c2p and p2c gather [N*heads, L, L] scores from request-relative positions."""
    model = packed("deberta_v2_qa", PackMode.unpack_repack.value)
    inferred = onnx.shape_inference.infer_shapes(model)
    assert _outputs_of(inferred, "GatherElements") == [[N * H, L, L]] * 4  # c2p, p2c x 2 layers
    assert "position_ids" not in [i.name for i in model.graph.input]


def test_deberta_embeddings_read_a_0_1_mask_in_attention_mask_mode():
    """DeBERTa multiplies its embeddings by attention_mask, which carries segment ids 1, 2, 3 in
    AttentionMask mode: that reader gets min(segment id, 1)."""
    model = packed("deberta_v2_qa", PackMode.attention_mask.value)
    mins = [n for n in model.graph.node if n.op_type == "Min" and "attention_mask" in n.input]
    assert len(mins) == 1
    readers = [n.op_type for n in model.graph.node if "attention_mask" in n.input]
    assert sorted(readers) == ["AttentionMask", "Min"]


def _compile_hand_built(tmp_path, term: str, mode: str) -> onnx.ModelProto:
    path = tmp_path / f"{term}.onnx"
    onnx.save(score_term_model(term), path)
    options = CompileOptions(
        input_shape={n: (BATCH, SEQ) for n in ("input_ids", "attention_mask", "position_ids")},
        pack_args={"max_valid_num": str(N), "segment_max_size": str(L), "mode": mode},
    )
    return compile(path, save=False, options=options).model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("term", ["relative", "combined", "absolute"])
def test_hand_built_score_terms(tmp_path, term, mode):
    """A relative-position bias (alone, or summed with the mask first as T5 does) packs in both modes;
    a bias per absolute key position only in unpack_repack, where each request gets its own positions."""
    if term == "absolute" and mode == PackMode.attention_mask.value:
        with pytest.raises(PassError, match=(
            r"^pass 'attention_mask_packing' failed: attention_mask packing cannot keep the score term that node "
            r"'add_bias' adds before Softmax 'softmax': it uses absolute positions in the row \(node 'row_positions' "
            r"\(Range\)\), which do not restart at each request; use pack_args mode=unpack_repack$"
        )):
            _compile_hand_built(tmp_path, term, mode)
        return
    model = _compile_hand_built(tmp_path, term, mode)
    source = ort.InferenceSession(score_term_model(term).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    lengths = [5, 16, 1, 9, 12, 3]
    requests = verify.make_requests(rng, [n for n in lengths], 50)
    for r in requests:
        r["position_ids"] = np.arange(r["input_ids"].shape[1], dtype=np.int64)[None]
    batch, per_request = verify.run_packed(model, requests)
    assert len(batch.specs) >= 4
    for spec, (got,) in zip(batch.specs, per_request, strict=True):
        request = requests[spec.index]
        (want,) = source.run(None, {k: request[k] for k in ("input_ids", "attention_mask", "position_ids")})
        np.testing.assert_allclose(got, want[0], atol=1e-4, rtol=0)
