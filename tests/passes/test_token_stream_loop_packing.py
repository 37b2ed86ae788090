"""token_stream_loop: attention in a Loop over the requests, each at its own length; every request
equals the original model run on it alone."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import VOCAB, model_path
from poprt_lite import compile, ir, runtime
from poprt_lite.compiler import CompileOptions, verify
from poprt_lite.errors import PassError, PoprtError
from poprt_lite.passes.base import PassContext
from poprt_lite.passes.token_stream_loop_packing import TokenStreamLoopPacking
from poprt_lite.vocab import PackMode

MODE = PackMode.token_stream_loop.value
N, L, MAX_TOKENS = 6, 16, 40
PACK_ARGS = {"mode": MODE, "max_valid_num": str(N), "segment_max_size": str(L), "max_tokens": str(MAX_TOKENS)}
# plain attention, pooled, score terms (MPNet's relative bias, DeBERTa's c2p/p2c), sdpa, kept mask terms
# (a band and a sliding window the padding mask does not cover), onnxruntime's fused ops
MODELS = [
    "bert_qa_torchscript", "bert_qa_dynamo", "bert_meanpool", "mpnet_qa", "deberta_v2_qa", "xlmr_sdpa_dynamo",
    "mask_band_where_dynamo", "modernbert_window_torchscript", "bert_qa_ort_optimized",
]


@functools.cache
def packed(name: str) -> onnx.ModelProto:
    return compile(model_path(name), save=False, options=CompileOptions(pack_args=PACK_ARGS)).model


def alone(name: str, request: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])
    n = request["input_ids"].shape[1]
    feeds = {**request, "position_ids": np.arange(n, dtype=np.int64)[None]}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


@pytest.mark.parametrize("name", MODELS)
def test_each_request_equals_the_original_alone(name):
    requests = verify.make_requests(np.random.default_rng(7), [5, 16, 1, 11, 7], VOCAB)
    batch, per_request = verify.run_packed(packed(name), requests)
    assert batch.unpack_info.tolist() == [5, 16, 1, 11, 7]
    for spec, got in zip(batch.specs, per_request, strict=True):
        for want, out in zip(alone(name, requests[spec.index]), got, strict=True):
            np.testing.assert_allclose(out, want[0], atol=1e-4, rtol=0)


def test_every_attention_block_is_a_loop_over_the_requests():
    model = packed("bert_qa_torchscript")
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 2  # the model's two layers
    assert not [n for n in model.graph.node if n.op_type in ("Softmax", "Repack")]
    for loop in loops:
        body = next(a.g for a in loop.attribute if a.name == "body")
        assert [n.op_type for n in body.node].count("Softmax") == 1
        assert not [n for n in body.node if n.domain]  # no custom op inside: a request's rows are its own tokens
        assert not body.initializer
    assert ir.get_metadata(model)["pack"].startswith(f'{{"mode": "{MODE}"')


def test_runs_through_the_runtime_like_token_stream(tmp_path):
    options = CompileOptions(pack_args=PACK_ARGS)
    result = compile(model_path("bert_meanpool"), tmp_path / "m.onnx", output_dir=tmp_path, export_popef=True, options=options)
    requests = verify.make_requests(np.random.default_rng(3), [3, 16, 9, 2, 14, 1, 6, 12], VOCAB)
    runner = runtime.Runner(result.artifact, threads=1)
    assert runner.interface.mode == MODE
    outputs = runner.run_requests([{k: v[0] for k, v in r.items()} for r in requests])
    for request, got in zip(requests, outputs, strict=True):
        want = alone("bert_meanpool", request)
        np.testing.assert_allclose(got["last_hidden_state"], want[0][0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["pooled"], want[1][0], atol=1e-4, rtol=0)


def test_refuses_an_opset_without_sequences():
    graph = ir.to_graph(onnx.load(str(model_path("bert_qa_torchscript"))))
    graph.opset = 10
    with pytest.raises(PoprtError) as err:
        TokenStreamLoopPacking(max_valid_num=N, segment_max_size=L, max_tokens=MAX_TOKENS).run(graph, PassContext())
    assert str(err.value) == (
        "token_stream_loop_packing needs opset >= 11 (a Loop over sequences); the model has opset 10: export it at a newer opset"
    )


def test_refuses_fp16():
    with pytest.raises(PassError) as err:
        compile(model_path("bert_qa_torchscript"), save=False, options=CompileOptions(precision="fp16", pack_args=PACK_ARGS))
    assert str(err.value).startswith("pass 'float_to_half' failed: float_to_half cannot convert node '")
    assert str(err.value).endswith(
        "(Loop): its body is an attention Loop over the requests (mode=token_stream_loop), built in float32; "
        "use precision fp32 with that mode, or mode=token_stream"
    )
