"""Packed models give each request the answer the original model gives it alone, unpadded."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QA_MODELS, VOCAB, model_path
from poprt_lite import compile, ir, ops, passes
from poprt_lite.compiler import verify
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import PassError
from poprt_lite.runtime import modes
from poprt_lite.vocab import PackMode

BATCH, SEQ, N, L = 3, 16, 6, 16
MAX_TOKENS = 40  # token_stream's budget: fewer than N requests of L tokens, so it limits some batches
MODES = [mode.value for mode in PackMode]
STATIC_MODES = [PackMode.unpack_repack.value, PackMode.attention_mask.value]
STREAM = PackMode.token_stream.value


def pack_options(source: onnx.ModelProto, mode: str, precision: str = "fp32") -> CompileOptions:
    """The test geometry's options for `mode`: batch [BATCH, SEQ], or a stream of MAX_TOKENS."""
    pack_args = {"max_valid_num": str(N), "segment_max_size": str(L), "mode": mode}
    if not modes.get(mode).static:
        shape, pack_args["max_tokens"] = {}, str(MAX_TOKENS)  # no static shape: the stream's length varies
    else:
        shape = {i.name: (BATCH, SEQ) for i in source.graph.input}
    return CompileOptions(precision=precision, input_shape=shape, pack_args=pack_args)


@functools.cache
def packed(name: str, mode: str, precision: str = "fp32") -> onnx.ModelProto:
    options = pack_options(ir.load_model(model_path(name)), mode, precision)
    return compile(model_path(name), save=False, options=options).model


@functools.cache
def packed_session(name: str, mode: str, precision: str = "fp32") -> ort.InferenceSession:
    return ort.InferenceSession(packed(name, mode, precision).SerializeToString(), providers=["CPUExecutionProvider"])


@functools.cache
def original_session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])


def original(name: str, request: dict) -> list[np.ndarray]:
    sess = original_session(name)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in request.items() if k in names})


def run_packed(name: str, mode: str, lengths: list[int], seed: int = 0, precision: str = "fp32"):
    """Pack requests of `lengths`; return the batch and, per packed request, (original outputs, packed outputs)."""
    requests = verify.make_requests(np.random.default_rng(seed), lengths, VOCAB)
    batch, per_request = verify.run_packed(packed(name, mode, precision), requests, packed_session(name, mode, precision))
    results = [
        ([o[0] for o in original(name, requests[spec.index])], got) for spec, got in zip(batch.specs, per_request, strict=True)
    ]
    return batch, results


lengths_strategy = st.lists(st.integers(1, L), min_size=1, max_size=N).flatmap(
    lambda xs: st.permutations(xs + [L]) if len(xs) < N else st.just(xs)
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", QA_MODELS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_strategy)
def test_packed_outputs_equal_original_per_request(name, mode, lengths):
    batch, results = run_packed(name, mode, lengths)
    assert batch.count >= 1
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def op_count(graph: onnx.GraphProto, op: str) -> int:
    """Nodes of type `op` in `graph` and its subgraphs (Loop bodies)."""
    count = 0
    for node in graph.node:
        count += node.op_type == op
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                count += op_count(attr.g, op)
    return count


@pytest.mark.parametrize("mode", MODES)
def test_sdpa_nan_guard_goes_where_only_packings_mask_masks_the_scores(mode):
    """bert_qa_dynamo's two blocks end in sdpa's `Where(IsNaN(p), 0, p)`. On unpacked rows packing's
    own mask (finite, every row has a real key) is all that masks the scores, so no Softmax row is
    all -inf and the guard goes; attention_mask's packed rows keep it (answers: the test above)."""
    assert op_count(ir.load_model(model_path("bert_qa_dynamo")).graph, "IsNaN") == 2
    assert op_count(packed("bert_qa_dynamo", mode).graph, "IsNaN") == (2 if mode == PackMode.attention_mask else 0)


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_batch_with_empty_rows(mode):
    batch, results = run_packed("bert_qa_torchscript", mode, [3, 2])
    assert len(results) == 2 and batch.data["attention_mask"][2].sum() == 0
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", [m for m in MODES if m != PackMode.token_stream_loop])  # fp32 only
@pytest.mark.parametrize("name", QA_MODELS)
def test_fp16_packed_max_error_per_request(name, mode):
    """Every token of every request against the float32 original alone: the largest error, not a
    mean, so that one wrong token fails (measured: at most 1.8e-3)."""
    batch, results = run_packed(name, mode, [16, 9, 4, 1, 12], precision="fp16")
    assert len(results) == batch.count >= 4  # token_stream's 40 tokens hold the first four
    errors = [float(np.abs(g.astype(np.float64) - w).max()) for want, got in results for w, g in zip(want, got, strict=True)]
    assert max(errors) < 1e-2, errors


def test_mean_pooling_is_per_request_in_unpack_repack_mode():
    model = packed("bert_meanpool", "unpack_repack")
    meta = ir.get_metadata(model)
    assert meta["layout.pooled"] == "per_request" and meta["layout.last_hidden_state"] == "unpacked"
    assert [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim] == [N, 64]
    _, results = run_packed("bert_meanpool", "unpack_repack", [5, 16, 2, 9])
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_mean_pooling_is_per_request_in_token_stream_mode():
    model = packed("bert_meanpool", STREAM)
    meta = ir.get_metadata(model)
    assert meta["layout.pooled"] == "per_request" and meta["layout.last_hidden_state"] == "stream"
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert shapes == {"last_hidden_state": [1, "tokens", 64], "pooled": ["requests", 64]}
    batch, results = run_packed("bert_meanpool", STREAM, [5, 16, 2, 9, 1])
    assert batch.data["input_ids"].shape == (1, 33) and batch.unpack_info.tolist() == [5, 16, 2, 9, 1]
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_packed_interface_and_manifest_metadata(mode):
    model = packed("bert_qa_torchscript", mode)
    meta = ir.get_metadata(model)
    assert json.loads(meta["pack"]) == {"mode": mode, "max_valid_num": N, "segment_max_size": L}
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    expected = {"input_ids": [BATCH, SEQ], "attention_mask": [BATCH, SEQ], "token_type_ids": [BATCH, SEQ], "position_ids": [BATCH, SEQ]}
    if mode == "unpack_repack":
        expected["unpack_info"] = [N]
    assert inputs == expected
    out_shape = [N, L] if mode == "unpack_repack" else [BATCH, SEQ]
    for output in model.graph.output:
        assert [d.dim_value for d in output.type.tensor_type.shape.dim] == out_shape
    custom = sorted({n.op_type for n in model.graph.node if n.domain == ops.DOMAIN})
    assert custom == (["PaddingMask", "Repack", "Unpack"] if mode == "unpack_repack" else ["AttentionMask"])
    # the exporter's padding-mask computation is gone: no Where with float32's min remains
    assert not [n for n in model.graph.node if n.op_type == "Where" and "Softmax" not in n.input[2]]


def test_token_stream_interface_and_manifest_metadata():
    model = packed("bert_qa_torchscript", STREAM)
    meta = ir.get_metadata(model)
    assert json.loads(meta["pack"]) == {"mode": STREAM, "max_valid_num": N, "segment_max_size": L, "max_tokens": MAX_TOKENS}
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {i.name: dims(i) for i in model.graph.input}
    stream = [1, "tokens"]
    assert inputs == {"input_ids": stream, "attention_mask": stream, "token_type_ids": stream, "position_ids": stream, "unpack_info": ["requests"]}
    assert {o.name: dims(o) for o in model.graph.output} == {"start_logits": stream, "end_logits": stream}
    assert {meta[f"layout.{o.name}"] for o in model.graph.output} == {"stream"}
    custom = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert sorted({n.op_type for n in custom}) == ["PaddingMask", "Repack", "Unpack"]
    # every Unpack and PaddingMask makes rows that follow the batch; attention runs on them, 2 layers x Q, K, V
    for node in custom:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs.get("dynamic", 1) == 1 and (node.op_type == "Repack" or attrs["segment_max_size"] == L)
    assert [n.op_type for n in custom].count("Unpack") == 6


@pytest.mark.parametrize("lengths", [[1], [L], [3, 1, 2], [L, L, 8]])
def test_token_stream_batch_is_as_long_as_its_tokens(lengths):
    batch, results = run_packed("bert_qa_torchscript", STREAM, lengths)
    assert batch.data["input_ids"].shape == (1, sum(lengths)) and batch.unpack_info.tolist() == lengths
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_token_stream_refuses_a_static_sequence():
    with_positions = compile(model_path("bert_qa_torchscript"), save=False, options=CompileOptions(export_position_ids=True)).model
    for value in with_positions.graph.input:
        value.type.tensor_type.shape.dim[1].dim_value = 32
    stream = passes.get_pass("token_stream_packing")(max_valid_num=4, segment_max_size=16, max_tokens=64)
    with pytest.raises(PassError, match=r"^pass 'token_stream_packing' failed: input 'input_ids' has shape \['batch', 32\]; mode=token_stream feeds one stream of any length as \[1, tokens\]: convert the model exported with dynamic \[batch, sequence\] axes, without input_shape$"):
        passes.PassManager([stream]).run(with_positions)


@pytest.mark.parametrize("mode", [PackMode.unpack_repack.value, STREAM])
def test_reference_evaluator_runs_packed_model_with_reference_kernels(mode):
    from onnx.reference import ReferenceEvaluator

    model = packed("bert_qa_torchscript", mode)
    rng = np.random.default_rng(5)
    lengths = [7, 3, 16]
    requests = verify.make_requests(rng, lengths, VOCAB)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.functions[:]  # make sure the numpy kernels, not the function bodies, run
    evaluator = ReferenceEvaluator(stripped, new_ops=ops.reference_ops())
    batch, per_request = verify.run_packed(model, requests, evaluator)
    assert len(batch.specs) == 3
    for spec, got in zip(batch.specs, per_request, strict=True):
        for want, g in zip(original("bert_qa_torchscript", requests[spec.index]), got, strict=True):
            np.testing.assert_allclose(g, want[0], atol=1e-4)
