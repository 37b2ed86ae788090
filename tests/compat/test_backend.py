"""get_session: PopRT's backend entry point, on converted models and on artifacts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

import poprt_lite
from poprt_lite import runtime
from poprt_lite.runtime import packing_utils
from poprt_lite.compat.backend import get_session
from poprt_lite.errors import ArtifactError, PoprtError

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
NAMES = ("input_ids", "attention_mask", "token_type_ids")
B, S, N = 2, 32, 6


def convert(tmp_path, mode=None):
    pack_args = {"max_valid_num": str(N), "segment_max_size": str(S), "mode": mode} if mode else {}
    options = poprt_lite.CompileOptions(
        export_position_ids=True, input_shape={n: (B, S) for n in NAMES}, pack_args=pack_args
    )
    out = tmp_path / (mode or "padded")
    return poprt_lite.compile(TESTDATA / "bert_qa_torchscript.onnx", out / "model.onnx", options=options).output_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("converted")
    return {mode: convert(tmp, mode) for mode in (None, "unpack_repack", "attention_mask")}


@pytest.fixture(scope="module")
def reference():
    session = ort.InferenceSession(str(TESTDATA / "bert_qa_torchscript.onnx"), providers=["CPUExecutionProvider"])

    def run(request):
        feeds = {
            "input_ids": request.input_ids[None].astype(np.int64),
            "attention_mask": np.ones((1, request.input_len), np.int64),
            "token_type_ids": request.token_type_ids[None].astype(np.int64),
        }
        return session.run(None, feeds)

    return run


def dataset(rng, lengths):
    return [
        SimpleNamespace(
            input_ids=rng.integers(3, 1000, n).astype(np.int32),
            attention_mask=np.ones(n, np.int32),
            token_type_ids=rng.integers(0, 2, n).astype(np.int32),
            position_ids=np.arange(n, dtype=np.int32),
            input_len=n,
        )
        for n in lengths
    ]


def test_converted_model_runs_without_writing_anything(converted, tmp_path, rng, reference):
    before = sorted(converted[None].parent.iterdir())
    sess = get_session(converted[None], 1, "poprt").load()
    assert sorted(converted[None].parent.iterdir()) == before
    data = dataset(rng, [5, 32])
    batch = packing_utils.pad_data(data, 0, B, S)
    start, end = sess.run(["start_logits", "end_logits"], batch.data)
    for spec, out in zip(batch.specs, packing_utils.unpack_outputs(batch, start, across_rows=False), strict=True):
        np.testing.assert_allclose(out, reference(data[spec.index])[0][0], atol=1e-4)


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask"])
def test_offline_packing_with_a_packed_model(converted, rng, reference, mode):
    across_rows = mode == "unpack_repack"
    sess = get_session(converted[mode], 1, "poprt").load()
    data = dataset(rng, rng.integers(1, S + 1, 20))
    index = 0
    while index < len(data):
        batch = packing_utils.pack_data(data, index, B, S, N, 1, across_rows)
        feeds = dict(batch.data)
        if across_rows:
            feeds["unpack_info"] = batch.unpack_info
        outputs = sess.run(["start_logits", "end_logits"], feeds)
        for k, out in enumerate(outputs):
            for spec, got in zip(batch.specs, packing_utils.unpack_outputs(batch, out, across_rows), strict=True):
                np.testing.assert_allclose(got, reference(data[spec.index])[k][0], atol=1e-4)
        index = batch.count


def test_export_popef_writes_the_artifact(converted, tmp_path, rng):
    out = tmp_path / "export"
    session = get_session(converted["attention_mask"], 1, "poprt", output_dir=str(out), export_popef=True)
    sess = session.load()
    path = out / "executable.popef"
    assert session.artifact_path == path and path.is_file()
    manifest = poprt_lite.load_artifact(path).manifest
    assert manifest["pack"] == {"mode": "attention_mask", "max_valid_num": N, "segment_max_size": S}
    assert isinstance(sess, runtime.ModelRunner)
    config = runtime.PackRunnerConfig(timeout_microseconds=0)
    config.enable_input_single_row_mode("attention_mask")
    with runtime.Runner(str(path), config) as runner:
        runner.execute({"input_ids": np.array([5, 6, 7])})
    # an artifact is loaded as is, and re-exported by copying it
    again = get_session(path, 1, "poprt", output_dir=tmp_path / "copy", export_popef=True)
    again.load()
    assert (tmp_path / "copy" / "executable.popef").read_bytes() == path.read_bytes()
    assert get_session(path, 1, "poprt").load().manifest == manifest


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((2, "poprt"), {}, "num_devices=2: poprt-lite runs on one CPU device; pass 1"),
        ((0, "poprt"), {}, "num_devices must be a positive integer, got 0"),
        ((1, "ipu"), {}, "unknown backend 'ipu'; use one of poprt, poprt-lite, poprt_lite, onnxruntime, cpu"),
        ((1, "poprt"), {"export_popef": True}, "export_popef=True needs output_dir, where executable.popef is written"),
    ],
)
def test_errors(converted, args, kwargs, message):
    with pytest.raises(PoprtError) as info:
        get_session(converted[None], *args, **kwargs).load()
    assert str(info.value) == message


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(PoprtError, match="does not exist"):
        get_session(tmp_path / "nope.onnx", 1, "poprt").load()
    bad = tmp_path / "executable.popef"
    bad.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip archive
    with pytest.raises(ArtifactError):
        get_session(bad, 1, "poprt").load()
