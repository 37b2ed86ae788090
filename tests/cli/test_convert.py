"""The flat PopRT form of the CLI, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import poprt_lite
from conftest import model_path
from poprt_lite import load_artifact
from poprt_lite.compiler import verify
from poprt_lite.cli.main import expand_multi_value_flags, main
from poprt_lite.runtime import ModelRunner

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
BERT = str(model_path("bert_qa_torchscript"))


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_multi_value_flags_are_expanded():
    argv = ["--input_shape", "a=1,2", "b=3", "--precision", "fp16", "--pack_args", "x=1", "y=2"]
    assert expand_multi_value_flags(argv) == [
        "--input_shape", "a=1,2", "--input_shape", "b=3", "--precision", "fp16", "--pack_args", "x=1", "--pack_args", "y=2",
    ]


@pytest.mark.parametrize(
    "command, text",
    [
        (["convert", "--help"], "max_valid_num=N segment_max_size=L [mode=M] [max_tokens=T] [dynamic_groups=[[input_ids,]]]"),
        (["bench", "--help"], "pip install '.[plot]'"),
    ],
)
def test_help_prints_brackets_as_written(capsys, command, text):
    assert main(command) == 0
    assert text in " ".join(capsys.readouterr().out.split())  # as written, wherever it wraps


def test_acceptance_command_writes_model_and_artifact_that_runs(tmp_path, capsys):
    out_model, art_dir = tmp_path / "o.onnx", tmp_path / "art"
    code, out, err = cli(
        capsys, "--input_model", BERT, "--output_model", str(out_model), "--precision", "fp16",
        "--input_shape", "input_ids=16,256", "attention_mask=16,256", "token_type_ids=16,256",
        "--export_popef", "--output_dir", str(art_dir),
    )
    assert code == 0, err
    for name in ("eliminate_identity", "static_shape", "fold_constants", "eliminate_dead_code", "float_to_half"):
        assert name in out
    assert "time (ms)" in out
    assert out_model.is_file() and (art_dir / "executable.popef").is_file()
    artifact = load_artifact(art_dir / "executable.popef")
    manifest = artifact.manifest
    assert manifest["precision"] == "fp16"
    assert [p["name"] for p in manifest["pipeline"]] == ["eliminate_identity", "static_shape", "fold_constants", "eliminate_dead_code", "float_to_half"]
    assert {i["name"]: (i["dtype"], i["shape"], i["role"]) for i in manifest["inputs"]} == {
        "input_ids": ("int64", [16, 256], "dynamic_input"),
        "attention_mask": ("int64", [16, 256], "attention_mask"),
        "token_type_ids": ("int64", [16, 256], "token_type_ids"),
    }
    runner = ModelRunner(art_dir / "executable.popef")
    feeds = {"input_ids": np.ones((16, 256), np.int32), "attention_mask": np.ones((16, 256), np.int64), "token_type_ids": np.zeros((16, 256), np.int64)}
    start, end = runner.run(["start_logits", "end_logits"], feeds)
    assert start.shape == (16, 256) and start.dtype == np.float32 and np.isfinite(start).all()


def test_check_reports_max_abs_diff(tmp_path, capsys):
    code, out, _ = cli(capsys, "--input_model", BERT, "--output_dir", str(tmp_path), "--export_position_ids", "--check")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("check: ")]
    diffs = [float(line.rsplit(" ", 1)[1]) for line in lines[:-1]]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert lines[-1] == f"check: ok: max abs diff {max(diffs):.3g} <= atol 0.0001"
    assert (tmp_path / "bert_qa_torchscript.poprt-lite.onnx").is_file()


def test_list_all_passes_includes_plugin(capsys):
    code, out, _ = cli(capsys, "--list_all_passes", "--plugin", str(PLUGINS / "scale_outputs.py"))
    assert code == 0
    for name in ("export_position_ids", "float_to_half", "static_shape", "pack_unpack_repack", "attention_mask_packing", "scale_outputs", "count_matmuls"):
        assert name in out


def test_plugin_pass_runs_end_to_end(tmp_path, capsys):
    base, scaled = tmp_path / "base.onnx", tmp_path / "scaled.onnx"
    assert cli(capsys, "--input_model", BERT, "--output_model", str(base), "--pipeline", "fold_constants")[0] == 0
    code, out, err = cli(
        capsys, "--input_model", BERT, "--output_model", str(scaled), "--plugin", str(PLUGINS / "scale_outputs.py"),
        "--pipeline", "fold_constants,scale_outputs,count_matmuls", "--pass_option", "scale_outputs.scale=0.5", "-v",
    )
    assert code == 0, err
    assert "2 outputs scaled by 0.5" in out
    from conftest import make_request, run
    from poprt_lite import ir

    request = make_request(np.random.default_rng(1), 9)
    for want, got in zip(run(base, request), run(scaled, request), strict=True):
        np.testing.assert_allclose(got, 0.5 * want, rtol=1e-6)
    # 2 layers x (Q, K, V, scores, context, output, 2 FFN) + the QA head
    assert ir.get_metadata(ir.load_model(scaled))["matmuls"] == "17"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--passes", "nope"], "error: unknown pass 'nope'; known passes: "),
        (["--pipeline", "nope"], "error: unknown pass 'nope'; known passes: "),
        (["--skip_passes", "nope"], "error: unknown pass 'nope'; known passes: "),
        (["--pipeline", "fold_constants", "--passes", "eliminate_identity"], "error: pipeline gives every pass to run; add or leave out passes in it instead of passes / skip_passes\n"),
        (["--passes", "insert_attention_mask"], "error: --pack_args needs max_valid_num=N (e.g. --pack_args max_valid_num=40 segment_max_size=256), or --input_shape input_ids=B,S to derive it\n"),
        (["--passes", "packed_transformer", "--input_shape", "input_ids=4,32"], "error: --pack_args needs max_valid_num=N (e.g. --pack_args max_valid_num=40 segment_max_size=256)\n"),
        (["--passes", "insert_attention_mask,packed_transformer"], "error: the passes name 2 packing passes (pack_unpack_repack, attention_mask_packing); a model packs in one mode\n"),
        (["--passes", "insert_attention_mask", "--pack_args", "mode=unpack_repack", "max_valid_num=4"], "error: --pack_args mode=unpack_repack contradicts the packing pass in --passes, which packs in attention_mask mode; drop one\n"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=13+51"], "error: --pack_args segment_max_size=13+51 gives several segments per request (PopRT's multi-segment packing), which poprt-lite does not do; give one size\n"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=8", "dynamic_groups=[[]]"], "error: --pack_args dynamic_groups must name the dynamic input, e.g. dynamic_groups=[[input_ids,]], got '[[]]'\n"),
        (["--precision", "fp8"], "error: --precision fp8 is not supported: FP8 is an IPU number format and onnxruntime's CPU provider has no FP8 MatMul; use --precision int8, fp16 or fp32\n"),
        (["--framework", "tensorflow"], "error: --framework tensorflow is not supported: poprt-lite reads ONNX models; convert yours with tf2onnx or torch.onnx first\n"),
        (["--remove_outputs", "nope"], "error: pass 'remove_outputs' failed: remove_outputs names 'nope', which is not a model output; outputs are: start_logits, end_logits\n"),
        (["--remove_outputs", "start_logits,end_logits"], "error: pass 'remove_outputs' failed: remove_outputs would remove every output of the model; keep at least one\n"),
        (["--logging_level", "LOUD"], "error: --logging_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'\n"),
        (["--input_shape", "input_ids=16,x"], "error: bad --input_shape 'input_ids=16,x': expected NAME=D0,D1,... with positive integers, e.g. input_ids=16,256"),
        (["--input_shape", "input_ids"], "error: bad --input_shape 'input_ids': expected NAME=D0,D1,..."),
        (["--input_shape", "nope=1,2"], "error: pass 'static_shape' failed: --input_shape names 'nope', which is not a model input; inputs are: input_ids, attention_mask, token_type_ids"),
        (["--plugin", str(PLUGINS / "broken_syntax.py")], f"error: plugin '{PLUGINS / 'broken_syntax.py'}' failed to import: SyntaxError: "),
        (["--precision", "int4"], "error: --precision must be fp32, fp16 or int8, got 'int4'"),
        (["--pack_args", "max_valid_num=40"], "error: --pack_args needs segment_max_size=N"),
        (["--pack_args", "max_valid_num=40", "segment_max_size=256", "color=red"], "error: unknown --pack_args key 'color'; known keys: mode, max_valid_num, segment_max_size, max_tokens, dynamic_groups, head_pattern, enable_double_batch_unpack\n"),
        (["--pack_args", "max_valid_num=forty", "segment_max_size=256"], "error: --pack_args max_valid_num must be a positive integer, got 'forty'"),
        (["--pack_args", "max_valid_num=0", "segment_max_size=256"], "error: --pack_args max_valid_num must be a positive integer, got 0"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=-3"], "error: --pack_args segment_max_size must be a positive integer, got -3"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=1000"], "error: pass 'pack_unpack_repack' failed: segment_max_size=1000 exceeds the model's position table (512 positions); use --pack_args segment_max_size<=512"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=8", "mode=magic"], "error: --pack_args mode must be one of unpack_repack, attention_mask, token_stream, token_stream_loop, got 'magic'"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=8", "mode=token_stream"], "error: --pack_args needs max_tokens=N (e.g. --pack_args mode=token_stream max_valid_num=40 segment_max_size=256 max_tokens=4096)\n"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=8", "mode=token_stream", "max_tokens=0"], "error: --pack_args max_tokens must be a positive integer, got 0\n"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=8", "mode=attention_mask", "max_tokens=64"], "error: --pack_args max_tokens does not apply to attention_mask mode; drop it\n"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=8", "max_tokens=64"], "error: --pack_args max_tokens does not apply to unpack_repack mode; drop it\n"),
        (["--input_shape", "input_ids=1,64", "--pack_args", "max_valid_num=4", "segment_max_size=8", "mode=token_stream", "max_tokens=64"], "error: --input_shape pins a static shape, but --pack_args mode=token_stream keeps the token dimension dynamic; drop --input_shape\n"),
        (["--dynamic_rows"], "error: --dynamic_rows keeps the first dim of --input_shape dynamic; give --input_shape\n"),
        (["--pack_args", "max_valid_num=4", "segment_max_size=16", "mode=token_stream", "max_tokens=8"], "error: pass 'token_stream_packing' failed: token_stream_packing needs max_tokens >= segment_max_size (8 < 16): a batch must hold the longest request (--pack_args max_tokens=N)\n"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    output = tmp_path / "out.onnx"
    code, out, err = cli(capsys, "--input_model", BERT, "--output_model", str(output), *argv)
    assert code == 2
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_non_onnx_input_file(tmp_path, capsys):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is not a protobuf")
    code, _, err = cli(capsys, "--input_model", str(bogus))
    assert code == 2
    assert err == f"error: '{bogus}' is not a valid ONNX model (DecodeError); pass an .onnx file exported by torch.onnx or similar\n"


def test_missing_input_model(capsys):
    code, _, err = cli(capsys, "--input_model", "no/such.onnx")
    assert (code, err) == (2, "error: model file 'no/such.onnx' does not exist; check --input_model\n")


def test_unknown_flag_is_one_line(capsys):
    code, _, err = cli(capsys, "--input_model", BERT, "--no_such_flag")
    assert code == 2 and err.startswith("error: No such option: --no_such_flag")


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask"])
def test_check_on_packed_model_compares_each_request_with_the_original(tmp_path, capsys, mode):
    code, out, err = cli(
        capsys, "--input_model", BERT, "--output_dir", str(tmp_path), "--input_shape", "input_ids=4,32",
        "--pack_args", "max_valid_num=6", "segment_max_size=32", f"mode={mode}", "--check", "--export_popef",
    )
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("check: ")]
    diffs = [float(line.rsplit(" ", 1)[1]) for line in lines[:-1]]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert lines[-1] == f"check: ok: max abs diff {max(diffs):.3g} <= atol 0.0001"
    manifest = load_artifact(tmp_path / "executable.popef").manifest
    assert manifest["pack"] == {"mode": mode, "max_valid_num": 6, "segment_max_size": 32}


PACKED = ["--input_shape", "input_ids=4,32", "--pack_args", "max_valid_num=6", "segment_max_size=32", "--export_popef"]


def test_check_fails_naming_an_output_the_packed_model_dropped(tmp_path, capsys):
    """A pass that drops an output (remove_outputs run through --passes, not asked for with
    --remove_outputs) leaves nothing to compare it with: the check fails, it does not pass on the rest."""
    out_dir = tmp_path / "out"
    code, out, err = cli(
        capsys, "--input_model", BERT, "--output_dir", str(out_dir), *PACKED, "--check", "--quiet",
        "--passes", "remove_outputs", "--pass_option", "remove_outputs.outputs=end_logits",
    )
    message = (
        "the converted model lacks output 'end_logits', which the source model has "
        "(to drop it on purpose: --remove_outputs end_logits)"
    )
    assert (code, out, err) == (1, f"check: FAILED: {message}\n", f"error: check failed: {message}; nothing written\n")
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "argv, compared",
    [
        ([*PACKED, "--remove_outputs", "end_logits"], ["start_logits"]),
        (["--checkpoints", "/model/bert/embeddings/LayerNorm/LayerNormalization_output_0"], ["start_logits", "end_logits"]),
    ],
    ids=["remove_outputs", "checkpoints"],
)
def test_check_compares_the_outputs_left_after_remove_outputs_or_checkpoints(tmp_path, capsys, argv, compared):
    code, out, err = cli(capsys, "--input_model", BERT, "--output_dir", str(tmp_path), *argv, "--check", "--quiet")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split(" max abs diff ")[0] for line in lines[:-1]] == [f"check: {name}" for name in compared]
    assert lines[-1].startswith("check: ok: max abs diff ")


def test_check_fails_naming_an_output_the_source_model_lacks(tmp_path):
    source = onnx.load(BERT)
    del source.graph.output[1]  # end_logits
    converted = poprt_lite.compile(BERT, tmp_path / "m.onnx", options=poprt_lite.CompileOptions()).output_model
    report = verify.check(source, converted)
    assert (report.passed, report.diffs) == (False, {})
    assert report.failure == (
        "the converted model has output 'end_logits', which the source model lacks "
        "(to add an intermediate tensor on purpose: checkpoints end_logits)"
    )


def test_list_all_ops(capsys):
    code, out, _ = cli(capsys, "--list_all_ops")
    assert code == 0
    for name in ("AttentionMask", "Unpack", "Repack", "PaddingMask", "SegmentPool"):
        assert name in out
    assert "ai.graphcore" in out


def test_corrupted_artifact_is_one_line_exit_2(tmp_path, capsys):
    assert cli(capsys, "--input_model", BERT, "--output_dir", str(tmp_path), "--export_popef", "--quiet")[0] == 0
    data = bytearray((tmp_path / "executable.popef").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.popef"
    bad.write_bytes(bytes(data))
    code, _, err = cli(capsys, "inspect", str(bad))
    assert (code, err) == (2, f"error: artifact '{bad}' is corrupt (Bad CRC-32 for file 'model.onnx'); re-export it\n")


def test_quiet_prints_nothing_on_success(tmp_path, capsys):
    code, out, err = cli(capsys, "--input_model", BERT, "--output_dir", str(tmp_path), "--precision", "fp16", "--quiet")
    assert (code, out) == (0, "")
