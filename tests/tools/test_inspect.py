"""`poprt-lite inspect` on a plain export and on a packed artifact."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import model_path
from poprt_lite import compile
from poprt_lite.cli.main import main
from poprt_lite.compiler import CompileOptions
from poprt_lite.tools.inspect import inspect_path, summarize

BERT = model_path("bert_qa_torchscript")


@pytest.fixture(scope="module")
def packed_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    options = CompileOptions(
        input_shape={"input_ids": (2, 16), "attention_mask": (2, 16), "token_type_ids": (2, 16)},
        pack_args={"max_valid_num": "4", "segment_max_size": "16", "mode": "unpack_repack"},
    )
    return compile(BERT, folder / "model.onnx", output_dir=folder, export_popef=True, options=options).artifact


def test_model_summary():
    report = inspect_path(BERT)
    assert report["kind"] == "model"
    assert report["inputs"] == [
        {"name": name, "dtype": "int64", "shape": ["batch", "sequence"]} for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert [(o["name"], o["dtype"]) for o in report["outputs"]] == [("start_logits", "float32"), ("end_logits", "float32")]
    assert report["opsets"] == {"ai.onnx": 17}
    assert report["nodes"] == 240 == sum(report["ops"].values())
    assert list(report["ops"].items())[:2] == [("Constant", 79), ("Unsqueeze", 29)]  # most frequent first
    assert report["custom_ops"] == [] and report["metadata"] == {} and "manifest" not in report
    assert report["initializers"]["count"] == 39


def test_custom_ops_and_poprt_metadata_only():
    model = onnx.load(BERT)
    model.graph.node.append(onnx.helper.make_node("Unpack", ["x", "info"], ["y"], domain="ai.graphcore"))
    onnx.helper.set_model_props(model, {"poprt_lite.precision": "fp16", "author": "someone"})
    report = summarize(model)
    assert report["custom_ops"] == [{"domain": "ai.graphcore", "op_type": "Unpack", "count": 1}]
    assert report["ops"]["ai.graphcore::Unpack"] == 1
    assert report["metadata"] == {"poprt_lite.precision": "fp16"}


def test_artifact_summary_has_roles_layouts_and_manifest(packed_artifact):
    report = inspect_path(packed_artifact)
    assert report["kind"] == "artifact"
    roles = {i["name"]: i["role"] for i in report["inputs"]}
    assert roles == {
        "input_ids": "dynamic_input",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
        "position_ids": "position_ids",
        "unpack_info": "unpack_info",
    }
    assert {o["name"]: o["layout"] for o in report["outputs"]} == {"start_logits": "unpacked", "end_logits": "unpacked"}
    assert {c["op_type"] for c in report["custom_ops"]} >= {"Unpack", "Repack"}
    manifest = report["manifest"]
    assert manifest["precision"] == "fp32"
    assert manifest["pack"] == {"mode": "unpack_repack", "max_valid_num": 4, "segment_max_size": 16}
    assert [step["name"] for step in manifest["pipeline"]][:4] == ["unfuse_ort", "eliminate_identity", "export_position_ids", "pack_unpack_repack"]
    assert all(step["seconds"] >= 0 for step in manifest["pipeline"])


def test_cli_text_and_json(packed_artifact, capsys):
    assert main(["inspect", str(packed_artifact)]) == 0
    out = capsys.readouterr().out
    assert "(artifact)" in out and "manifest: precision fp32" in out and "ai.graphcore::Unpack" in out
    assert main(["inspect", "--json", str(packed_artifact)]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["precision"] == "fp32"


def test_cli_bad_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
