"""fuse_packed_attention: plain attention blocks of an attention_mask-packed model become onnxruntime's
MultiHeadAttention, and every request still gets the original model's answers (run alone, unpadded)."""

from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import pytest

import poprt_lite
from cli.test_convert import cli
from conftest import TESTDATA
from poprt_lite import runtime
from poprt_lite.errors import PassError
from poprt_lite.ir import ORT_DOMAIN
from poprt_lite.passes.fuse_packed_attention import FUSED_OP
from poprt_lite.vocab import PackMode
from robustness.test_differential import MODES, assert_answers, expected, pack_data_loop, requests_for

PASS = "fuse_packed_attention"
LAYERS, HEADS, HEAD_DIM = 2, 4, 16  # the tiny test models
FUSED_MODELS = ["bert_qa_torchscript", "bert_qa_dynamo", "roberta_qa", "distilbert_qa", "st_mean_norm_torchscript", "xlmr_sdpa"]
UNTOUCHED_MODELS = ["mpnet_qa", "deberta_v2_cls"]  # score terms besides the mask: relative-position bias, c2p / p2c


@functools.cache
def compiled(model: str, tmp: str, fused: bool = True, precision: str = "fp32") -> str:
    """The model's attention_mask artifact (the differential test's shapes), with or without the pass."""
    out = f"{tmp}/{model}_{fused}_{precision}"
    options = poprt_lite.CompileOptions(**MODES[PackMode.attention_mask], passes=[PASS] if fused else [], precision=precision)
    return str(poprt_lite.compile(TESTDATA / f"{model}.onnx", f"{out}/model.onnx", output_dir=out, export_popef=True, options=options).artifact)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fused_attention"))


def graph_of(artifact: str) -> onnx.GraphProto:
    return poprt_lite.load_artifact(artifact).model().graph


def op_counts(artifact: str) -> collections.Counter:
    return collections.Counter(n.op_type for n in graph_of(artifact).node)


@pytest.mark.parametrize("model", FUSED_MODELS)
def test_every_request_equals_the_original_model_alone(model, workdir):
    runner = runtime.Runner(compiled(model, workdir), threads=1)
    requests = requests_for(runner.interface, seed=5, count=13)
    assert_answers(model, requests, runner.run_requests(requests))
    assert_answers(model, requests, pack_data_loop(runner, requests, artifact=compiled(model, workdir)))


@pytest.mark.parametrize("model", FUSED_MODELS)
def test_each_plain_block_is_one_multi_head_attention_node(model, workdir):
    artifact = compiled(model, workdir)
    graph = graph_of(artifact)
    fused = [n for n in graph.node if n.op_type == FUSED_OP]
    assert len(fused) == LAYERS and all(n.domain == ORT_DOMAIN for n in fused)
    counts = op_counts(artifact)
    assert counts["Softmax"] == 0 and counts["Transpose"] == 0
    unfused = op_counts(compiled(model, workdir, fused=False))
    assert counts["MatMul"] == unfused["MatMul"] - 2 * LAYERS  # Q K^T and P V, per layer
    (mask,) = [n.output[0] for n in graph.node if n.op_type == "AttentionMask"]
    initializers = {t.name: t for t in graph.initializer}
    for node in fused:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == HEADS
        assert attrs["scale"] == pytest.approx(HEAD_DIM**-0.5, rel=1e-6)
        assert node.input[5] == mask and node.input[4] == ""
        assert list(initializers[node.input[3]].dims) == [3 * HEADS * HEAD_DIM]  # the Q, K, V projection biases


@pytest.mark.parametrize("model", UNTOUCHED_MODELS)
def test_blocks_with_score_biases_stay_untouched(model, workdir):
    counts, unfused = op_counts(compiled(model, workdir)), op_counts(compiled(model, workdir, fused=False))
    assert counts[FUSED_OP] == 0 and counts["Softmax"] == LAYERS
    assert counts == unfused


def test_the_pipeline_reports_what_it_fused(tmp_path):
    options = poprt_lite.CompileOptions(**MODES[PackMode.attention_mask], passes=[PASS])
    for model, message in (("bert_qa_torchscript", "2 of 2 attention blocks fused"), ("mpnet_qa", "0 of 2 attention blocks fused")):
        result = poprt_lite.compile(TESTDATA / f"{model}.onnx", tmp_path / model / "model.onnx", options=options)
        (record,) = [r for r in result.records if r.name == PASS]
        assert record.message == f"{message} into {FUSED_OP}" and record.changed == message.startswith("2")


@pytest.mark.parametrize("mode", [PackMode.unpack_repack, None])
def test_a_model_without_attention_mask_packing_is_refused(mode, tmp_path):
    options = dict(MODES[mode]) if mode is not None else {}
    with pytest.raises(PassError) as info:
        poprt_lite.compile(TESTDATA / "bert_qa_torchscript.onnx", tmp_path / "model.onnx", options=poprt_lite.CompileOptions(**options, passes=[PASS]))
    assert str(info.value) == (
        f"pass '{PASS}' failed: {PASS} fuses the attention of a model packed in {PackMode.attention_mask.value} mode (one AttentionMask node), "
        f"found 0 AttentionMask nodes; give pack_args mode={PackMode.attention_mask.value}"
    )
    assert not any(tmp_path.iterdir())


def test_the_cli_refuses_it_without_packing_in_one_line(capsys, tmp_path):
    code, out, err = cli(capsys, "--input_model", str(TESTDATA / "bert_qa_torchscript.onnx"), "--output_dir", str(tmp_path / "out"), "--passes", PASS)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"found 0 AttentionMask nodes; give --pack_args mode={PackMode.attention_mask.value}")
    assert not (tmp_path / "out").exists()


def test_float16_fused_model_matches_the_unfused_one_and_the_original(workdir):
    """--precision fp16 converts the fused node too (onnxruntime's CPU kernel runs float16). Every
    request's every token is also compared with the float32 original run alone, by the largest
    error (measured: at most 1.5e-3)."""
    fused = runtime.Runner(compiled("bert_qa_torchscript", workdir, precision="fp16"), threads=1)
    plain = runtime.Runner(compiled("bert_qa_torchscript", workdir, fused=False, precision="fp16"), threads=1)
    assert op_counts(compiled("bert_qa_torchscript", workdir, precision="fp16"))[FUSED_OP] == LAYERS
    requests = requests_for(fused.interface, seed=7)
    answers = fused.run_requests(requests)
    for got, want in zip(answers, plain.run_requests(requests), strict=True):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=2e-2, rtol=0)
    for request, got in zip(requests, answers, strict=True):
        original = expected("bert_qa_torchscript", request)
        assert set(got) == set(original)
        for name, want in original.items():
            assert got[name].shape == want.shape
            error = float(np.abs(got[name].astype(np.float64) - want).max())
            assert error < 1e-2, (name, error)
