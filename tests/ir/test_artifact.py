from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import model_path
from poprt_lite import compile, load_artifact
from poprt_lite.ir.artifact import FORMAT_VERSION, sha256
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import RequestError, ArtifactError
from poprt_lite.runtime import ModelRunner


@pytest.fixture(scope="module")
def packed_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("art")
    options = CompileOptions(
        input_shape={"input_ids": (2, 32), "attention_mask": (2, 32)},
        pack_args={"max_valid_num": "4", "segment_max_size": "32"},
    )
    result = compile(model_path("roberta_qa"), folder / "m.onnx", output_dir=folder, export_popef=True, options=options)
    return result.artifact


def test_manifest_describes_the_packed_interface(packed_artifact):
    manifest = load_artifact(packed_artifact).manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["source_model_sha256"] == sha256(model_path("roberta_qa").read_bytes())
    assert manifest["pack"] == {"mode": "unpack_repack", "max_valid_num": 4, "segment_max_size": 32}
    assert manifest["position_offset"] == 2 and manifest["vocab_size"] == 1000
    assert manifest["custom_op_domains"] == ["ai.graphcore"]
    assert [(i["name"], i["dtype"], i["shape"], i["role"]) for i in manifest["inputs"]] == [
        ("input_ids", "int64", [2, 32], "dynamic_input"),
        ("attention_mask", "int64", [2, 32], "attention_mask"),
        ("position_ids", "int64", [2, 32], "position_ids"),
        ("unpack_info", "int32", [4], "unpack_info"),
    ]
    # ids index embedding tables: the runtime refuses ids past them before running
    assert {i["name"]: i["table_rows"] for i in manifest["inputs"]} == {
        "input_ids": 1000, "attention_mask": None, "position_ids": 514, "unpack_info": None,
    }
    assert [(o["name"], o["shape"], o["layout"]) for o in manifest["outputs"]] == [
        ("start_logits", [4, 32], "unpacked"),
        ("end_logits", [4, 32], "unpacked"),
    ]
    names = [p["name"] for p in manifest["pipeline"]]
    assert names == ["unfuse_ort", "eliminate_identity", "export_position_ids", "pack_unpack_repack", "static_shape", "fold_constants", "eliminate_dead_code"]
    assert manifest["pipeline"][3]["options"]["max_valid_num"] == 4


def test_runner_validates_feeds_against_the_manifest(packed_artifact):
    runner = ModelRunner(packed_artifact)
    feeds = {
        "input_ids": np.full((2, 32), 5, np.int32),  # int32 accepted and cast
        "attention_mask": np.ones((2, 32), np.int64),
        "position_ids": np.concatenate([np.arange(32), np.arange(20), np.arange(12)]).reshape(2, 32) + 2,
        "unpack_info": np.array([32, 20, 12, 0], np.int32),  # request 2 starts at row 1, column 20
    }
    start, end = runner.run(None, feeds)
    assert start.shape == (4, 32) and not start[3].any()
    with pytest.raises(Exception, match=r"^feed 'input_ids' has shape \[2, 16\]; the model expects \[2,32\]$"):
        runner.run(None, {**feeds, "input_ids": np.ones((2, 16), np.int64)})
    with pytest.raises(Exception, match=r"^missing feed 'unpack_info'; the model takes: input_ids, attention_mask, position_ids, unpack_info$"):
        runner.run(None, {k: v for k, v in feeds.items() if k != "unpack_info"})
    with pytest.raises(Exception, match=r"^feed 'position_ids' has ids >= 514, the number of rows of the embedding table it indexes$"):
        runner.run(None, {**feeds, "position_ids": np.full((2, 32), 514)})
    with pytest.raises(Exception, match=r"^output array 'start_logits' has dtype int32; the model gives float32$"):
        runner.execute(feeds, {"start_logits": np.zeros((4, 32), np.int32)})
    with pytest.raises(Exception, match=r"^feed 'attention_mask' has dtype float32; the model expects int64$"):
        runner.run(None, {**feeds, "attention_mask": np.ones((2, 32), np.float32)})
    with pytest.raises(RequestError, match=r"^feed 'position_ids' starts request 2 \(at row 1, column 20\) at 22; the artifact's position ids start at 2"):
        runner.run(None, {**feeds, "position_ids": np.tile(np.arange(32) + 2, (2, 1))})


def edited_copy(artifact: Path, member: str, edit: Callable[[bytes], bytes], tmp_path: Path) -> Path:
    """A copy of `artifact` with `member`'s bytes passed through `edit` (the checksums left as they were)."""
    copy = tmp_path / "executable.popef"
    with zipfile.ZipFile(artifact) as src, zipfile.ZipFile(copy, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, edit(data) if info.filename == member else data)
    return copy


def test_corrupted_model_member_is_refused(packed_artifact, tmp_path):
    bad = edited_copy(packed_artifact, "model.onnx", lambda data: data[:-10] + b"0123456789", tmp_path)
    with pytest.raises(ArtifactError, match=r"model checksum mismatch \(corrupted or tampered\); re-export it$"):
        load_artifact(bad)


def test_edited_manifest_is_refused(packed_artifact, tmp_path):
    def more_requests(data: bytes) -> bytes:
        manifest = json.loads(data)
        manifest["pack"]["max_valid_num"] = 40
        return json.dumps(manifest).encode()

    bad = edited_copy(packed_artifact, "manifest.json", more_requests, tmp_path)
    with pytest.raises(ArtifactError, match=r"manifest checksum mismatch \(corrupted or edited\); re-export it$"):
        load_artifact(bad)


def test_truncated_file_is_refused(packed_artifact, tmp_path):
    bad = tmp_path / "executable.popef"
    bad.write_bytes(packed_artifact.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"is not a poprt-lite artifact .*; compile one with export_popef$"):
        load_artifact(bad)
