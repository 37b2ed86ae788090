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
from poprt_lite import compile, ir, ops, verify
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import PassError

BATCH, SEQ, N, L = 3, 16, 6, 16
MODES = ["unpack_repack", "attention_mask"]


@functools.cache
def packed(name: str, mode: str, precision: str = "fp32") -> onnx.ModelProto:
    source = ir.load_model(model_path(name))
    shape = {i.name: (BATCH, SEQ) for i in source.graph.input}
    options = CompileOptions(
        precision=precision,
        input_shape=shape,
        pack_args={"max_valid_num": str(N), "segment_max_size": str(L), "mode": mode},
    )
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
        ([o[0] for o in original(name, requests[spec.index])], got) for spec, got in zip(batch.specs, per_request)
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
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_batch_with_empty_rows(mode):
    batch, results = run_packed("bert_qa_torchscript", mode, [3, 2])
    assert len(results) == 2 and batch.data["attention_mask"][2].sum() == 0
    for want, got in results:
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", QA_MODELS)
def test_fp16_packed_mae(name, mode):
    _, results = run_packed(name, mode, [16, 9, 4, 1, 12], precision="fp16")
    errors = [np.abs(g.astype(np.float64) - w).mean() for want, got in results for w, g in zip(want, got)]
    assert max(errors) < 1e-2, errors


def test_mean_pooling_is_per_request_in_unpack_repack_mode():
    model = packed("bert_meanpool", "unpack_repack")
    meta = ir.get_metadata(model)
    assert meta["layout.pooled"] == "per_request" and meta["layout.last_hidden_state"] == "unpacked"
    assert [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim] == [N, 64]
    _, results = run_packed("bert_meanpool", "unpack_repack", [5, 16, 2, 9])
    for want, got in results:
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_mean_pooling_is_refused_in_attention_mask_mode():
    with pytest.raises(PassError, match=r"^pass 'attention_mask_packing' failed: attention_mask packing cannot keep node '/ReduceSum(_1)?' \(ReduceSum\) per request: it mixes the tokens of a packed row; use --pack_args mode=unpack_repack$"):
        packed("bert_meanpool", "attention_mask")


@pytest.mark.parametrize("mode", MODES)
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


def test_reference_evaluator_runs_packed_model_with_reference_kernels():
    from onnx.reference import ReferenceEvaluator

    model = packed("bert_qa_torchscript", "unpack_repack")
    rng = np.random.default_rng(5)
    lengths = [7, 3, 16]
    requests = verify.make_requests(rng, lengths, VOCAB)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.functions[:]  # make sure the numpy kernels, not the function bodies, run
    evaluator = ReferenceEvaluator(stripped, new_ops=ops.reference_ops())
    batch, per_request = verify.run_packed(model, requests, evaluator)
    assert len(batch.specs) == 3
    for spec, got in zip(batch.specs, per_request):
        for want, g in zip(original("bert_qa_torchscript", requests[spec.index]), got):
            np.testing.assert_allclose(g, want[0], atol=1e-4)
