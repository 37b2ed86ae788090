"""ModelRunner / runtime.Runner(path): fixed-shape runs with every feed checked first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import poprt_lite
from poprt_lite import runtime
from poprt_lite.errors import RequestError

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
B, S = 2, 16


@pytest.fixture(scope="module")
def padded_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("padded")
    options = poprt_lite.CompileOptions(
        export_position_ids=True,
        input_shape={n: (B, S) for n in ("input_ids", "attention_mask", "token_type_ids")},
    )
    return poprt_lite.compile(
        TESTDATA / "bert_qa_torchscript.onnx", out / "model.onnx", output_dir=out, export_popef=True, options=options
    ).artifact


def padded_feeds(rng, lengths, dtype=np.int64):
    feeds = {n: np.zeros((B, S), dtype) for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
    for row, n in enumerate(lengths):
        feeds["input_ids"][row, :n] = rng.integers(3, 1000, n)
        feeds["attention_mask"][row, :n] = 1
        feeds["token_type_ids"][row, :n] = rng.integers(0, 2, n)
        feeds["position_ids"][row, :n] = np.arange(n)
    return feeds


def reference(feeds, row, n):
    session = ort.InferenceSession(str(TESTDATA / "bert_qa_torchscript.onnx"), providers=["CPUExecutionProvider"])
    names = ("input_ids", "attention_mask", "token_type_ids")
    return session.run(None, {k: feeds[k][row : row + 1, :n].astype(np.int64) for k in names})


def test_runs_like_the_original_model(padded_artifact, rng):
    runner = runtime.Runner(padded_artifact)
    assert isinstance(runner, runtime.ModelRunner) and runner.output_names == ["start_logits", "end_logits"]
    feeds = padded_feeds(rng, [16, 9], np.int32)  # int32 feeds, as PopRT's example sends, are cast
    start, end = runner.run(["start_logits", "end_logits"], feeds)
    assert start.shape == (B, S)
    for row, n in enumerate([16, 9]):
        want_start, want_end = reference(feeds, row, n)
        np.testing.assert_allclose(start[row, :n], want_start[0], atol=1e-4)
        np.testing.assert_allclose(end[row, :n], want_end[0], atol=1e-4)
    outputs = {"end_logits": np.zeros((B, S), np.float32)}
    runner.execute(feeds, outputs)
    np.testing.assert_array_equal(outputs["end_logits"], end)
    assert len(runner.run(None, feeds)) == 2


def test_thread_count(padded_artifact, rng):
    runner = runtime.Runner(padded_artifact, threads=1)
    feeds = padded_feeds(rng, [3, 4])
    np.testing.assert_allclose(runner.run(None, feeds)[0], runtime.ModelRunner(padded_artifact).run(None, feeds)[0], atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("position_ids"), "missing feed 'position_ids'; the model takes: input_ids, attention_mask, token_type_ids, position_ids"),
        (lambda f: f.update(extra=f["input_ids"]), "unexpected feed 'extra'; the model takes: input_ids, attention_mask, token_type_ids, position_ids"),
        (lambda f: f.update(input_ids=f["input_ids"][:, :8]), "feed 'input_ids' has shape [2, 8]; the model expects [2,16]"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.float32)), "feed 'input_ids' has dtype float32; the model expects int64"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.uint64) + 2**63), "feed 'input_ids' has values outside the range of int64"),
    ],
)
def test_feeds_are_checked(padded_artifact, rng, change, message):
    runner = runtime.Runner(padded_artifact)
    feeds = padded_feeds(rng, [3, 4])
    change(feeds)
    with pytest.raises(RequestError) as info:
        runner.run(None, feeds)
    assert str(info.value) == message


def test_output_checks(padded_artifact, rng):
    runner = runtime.Runner(padded_artifact)
    feeds = padded_feeds(rng, [3, 4])
    with pytest.raises(RequestError, match="model has no output 'logits'; outputs are: start_logits, end_logits"):
        runner.run(["logits"], feeds)
    with pytest.raises(RequestError, match=r"output array 'start_logits' has shape \[16\]; the model gives \[2, 16\]"):
        runner.execute(feeds, {"start_logits": np.zeros(16, np.float32)})
