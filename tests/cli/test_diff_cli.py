"""`poprt-lite diff`: exit codes 0 (equal), 1 (different), 2 (error), text and JSON output."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import model_path
from poprt_lite import compile
from poprt_lite.cli.main import main

BERT = model_path("bert_qa_torchscript")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["diff", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def softmax_changed(tmp_path):
    model = onnx.load(BERT)
    next(n for n in model.graph.node if n.op_type == "Softmax").attribute[0].i = 1
    path = tmp_path / "changed.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def bias_changed(tmp_path):
    model = onnx.load(BERT)
    bias = next(t for t in model.graph.initializer if t.name.endswith(".bias"))
    bias.raw_data = bytes(len(bias.raw_data))
    path = tmp_path / "bias.onnx"
    onnx.save(model, path)
    return path


def test_equal_models_exit_0(capsys):
    code, out, _ = run(capsys, BERT, BERT)
    assert code == 0
    assert out == f"equal: {BERT} and {BERT} compute the same graph (240 nodes)\n"


def test_different_models_exit_1(capsys, softmax_changed):
    code, out, _ = run(capsys, BERT, softmax_changed)
    assert code == 1
    lines = out.splitlines()
    assert lines[:2] == [f"different: {BERT} -> {softmax_changed}", "  nodes: 240 -> 240: 1 changed (Softmax 1)"]
    assert lines[2].startswith("~ node Softmax ") and lines[2].endswith("attribute axis: -1 -> 1")
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal


def test_json_output(capsys, softmax_changed):
    code, out, _ = run(capsys, BERT, softmax_changed, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["equal"] is False and report["summary"]["nodes"]["changed"] == {"Softmax": 1}


def test_ignore_initializer_values(capsys, bias_changed):
    assert run(capsys, BERT, bias_changed)[0] == 1
    assert run(capsys, BERT, bias_changed, "--ignore", "initializer_values")[0] == 0
    assert run(capsys, BERT, bias_changed, "--ignore", "metadata,initializer_values", "--ignore", "doc_strings")[0] == 0


def test_artifact_against_its_model(tmp_path, capsys):
    result = compile(BERT, tmp_path / "model.onnx", output_dir=tmp_path, export_popef=True)
    assert run(capsys, result.artifact, result.output_model)[0] == 0
    code, out, _ = run(capsys, BERT, result.artifact)
    assert code == 1 and "- node Constant" in out


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: p.write_text("hello, not a model\n"), "is not a valid ONNX model"),
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"PK\x05\x06" + bytes(18)), "artifact"),  # an empty zip: not an artifact
    ],
    ids=["text", "missing", "empty-zip"],
)
def test_bad_file_exits_2_with_one_line(tmp_path, capsys, make_bad, message):
    bad = tmp_path / "bad.onnx"
    make_bad(bad)
    code, out, err = run(capsys, bad, BERT)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_ignore_exits_2(capsys):
    code, _, err = run(capsys, BERT, BERT, "--ignore", "weights")
    assert code == 2 and err == "error: --ignore takes initializer_values, doc_strings, metadata; got 'weights'\n"
