"""quantize_int8 (`precision int8`): what the graph becomes, requests independent of their batch in
every packing mode, accuracy against the float32 model, and the refusal of quantize_dynamic's
whole-tensor activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import TESTDATA, model_path
from poprt_lite import compile
from poprt_lite.compiler import CompileOptions, default_pipeline, verify
from poprt_lite.errors import PoprtError
from poprt_lite.passes.quantize_int8 import KERNEL, LEVELS, ORT_DOMAIN

EMBEDDINGS = ["st_mean_norm_torchscript", "st_cls_norm_torchscript", "st_max_torchscript", "st_mean_norm_dynamo"]
MODES = ["token_stream", "token_stream_loop", "attention_mask", "unpack_repack"]
N, L = 8, 64


def packed(name: str, mode: str, precision: str = "int8") -> onnx.ModelProto:
    args = {"mode": mode, "max_valid_num": str(N), "segment_max_size": str(L)}
    shape = {}
    if mode.startswith("token_stream"):  # token_stream, token_stream_loop
        args["max_tokens"] = str(4 * L)
    else:
        inputs = [i.name for i in onnx.load(str(model_path(name)), load_external_data=False).graph.input]
        shape = {i: (N, L) for i in inputs}
    return compile(model_path(name), save=False, options=CompileOptions(input_shape=shape, pack_args=args, precision=precision)).model


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_every_matmul_with_weights_becomes_an_integer_product():
    source = onnx.load(str(model_path("st_mean_norm_torchscript")))
    converted = compile(model_path("st_mean_norm_torchscript"), save=False, options=CompileOptions(precision="int8")).model
    kernels = [n for n in converted.graph.node if n.op_type == KERNEL]
    assert len(kernels) == len(weight_matmuls(source)) == 12
    assert weight_matmuls(converted) == []
    assert {n.domain for n in kernels} == {ORT_DOMAIN}
    initializers = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    for node in kernels:
        weight = initializers[node.input[1]]
        assert weight.dtype == np.int8
        np.testing.assert_array_equal(np.abs(weight).max(axis=0), LEVELS)  # per output channel, full range
    assert dict(p.split("=") for p in [f"{m.key}={m.value}" for m in converted.metadata_props])["poprt_lite.precision"] == "int8"


@pytest.mark.parametrize("mode", MODES)
def test_a_request_gets_the_same_vector_in_any_batch(mode):
    model = packed("st_mean_norm_torchscript", mode)
    session = verify.session(model)
    rng = np.random.default_rng(3)
    requests = verify.make_requests(rng, [37, 5, 60, 9, 64, 20, 3, 48], 1000)
    first = [0, 1, 2, 3, 4, 5, 6, 7]
    second = [4, 7, 2, 6, 0, 5, 1, 3]

    def vectors(order):
        batch, outputs = verify.run_packed(model, [requests[i] for i in order], session)
        assert batch.count == len(order)
        return {order[spec.index]: out[1] for spec, out in zip(batch.specs, outputs, strict=True)}

    one, other = vectors(first), vectors(second)
    for i in range(len(requests)):
        assert np.abs(one[i] - other[i]).max() <= 1e-6
        assert np.abs(one[i] - vectors([i])[i]).max() <= 1e-6


def test_attention_mask_softmaxes_sum_in_key_order():
    """A request's attention probabilities do not depend on its offset in the row (onnxruntime's
    Softmax sums in vector lanes: the last bit does)."""
    model = packed("st_mean_norm_torchscript", "attention_mask")
    ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in ops and ops.count("Exp") == 2  # the tiny model's two layers
    for mode in ("token_stream", "unpack_repack"):
        assert "Softmax" in [n.op_type for n in packed("st_mean_norm_torchscript", mode).graph.node]


@pytest.mark.parametrize("name", EMBEDDINGS)
def test_embeddings_stay_within_cosine_0_999_of_float32(name):
    model = packed(name, "token_stream")
    original = ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])
    names = {i.name for i in original.get_inputs()}
    requests = verify.make_requests(np.random.default_rng(4), [1, 7, 30, 64, 12, 50], 1000)
    batch, outputs = verify.run_packed(model, requests)
    for spec, out in zip(batch.specs, outputs, strict=True):
        want = original.run(["sentence_embedding"], {k: v for k, v in requests[spec.index].items() if k in names})[0][0]
        got = out[[o.name for o in model.graph.output].index("sentence_embedding")]
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999


@pytest.mark.parametrize("name", ["bert_qa_torchscript", "roberta_qa", "distilbert_qa", "mpnet_qa", "deberta_v2_cls", "xlmr_sdpa"])
def test_other_models_stay_within_the_int8_check_tolerance(name):
    diffs = verify.max_abs_diff(model_path(name), packed(name, "token_stream"))
    assert 0 < max(diffs.values()) <= verify.DEFAULT_ATOL["int8"] / 2


def test_precision_int8_ends_the_pipeline_with_quantize_int8():
    assert default_pipeline(CompileOptions(precision="int8"))[-1] == "quantize_int8"
    assert CompileOptions(passes=["quantize_int8"]).precision == "int8"
    with pytest.raises(PoprtError, match=r"^precision fp16 and passes quantize_int8 ask for different precisions; a model has one: give one of them$"):
        CompileOptions(precision="fp16", passes=["quantize_int8"])


@pytest.fixture(scope="module")
def quantize_dynamic_model(tmp_path_factory):
    """The tiny sentence model through onnxruntime.quantization.quantize_dynamic (MatMuls, as
    sentence-transformers' and optimum's int8 exports quantize)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path_factory.mktemp("quantized") / "model.onnx"
    quantize_dynamic(str(TESTDATA / "st_mean_norm_torchscript.onnx"), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return path


@pytest.mark.parametrize("mode", MODES)
def test_quantize_dynamic_models_are_refused_naming_the_node(quantize_dynamic_model, mode):
    args = {"mode": mode, "max_valid_num": str(N), "segment_max_size": str(L)}
    shape = {}
    if mode.startswith("token_stream"):  # token_stream, token_stream_loop
        args["max_tokens"] = str(4 * L)
    else:
        shape = {n: (3, L) for n in ("input_ids", "attention_mask", "token_type_ids")}
    first = next(n.name for n in onnx.load(str(quantize_dynamic_model)).graph.node if n.op_type == "DynamicQuantizeLinear")
    message = (
        rf"node '{first}' \(DynamicQuantizeLinear\) quantizes its input with one scale for the whole tensor \(quantize_dynamic's "
        r"activations\): in a packed batch every request's answer would depend on the other requests in it, in every packing mode; "
        r"pack the float32 model with precision int8 \(activations quantized per token\) instead$"
    )
    with pytest.raises(PoprtError, match=message):
        compile(quantize_dynamic_model, save=False, options=CompileOptions(input_shape=shape, pack_args=args))
