"""Bad models through the CLI: one line on stderr naming the problem, exit code 2, no output left.

Every conversion here asks for both outputs (`--output_dir` with the default model name, and
`--export_popef`), so a failure that left a partial or temporary file behind would show in the
output folder.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import model_path
from poprt_lite import compile, ir
from poprt_lite.ir import artifact
from poprt_lite.compiler import verify
from poprt_lite.cli.main import main
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import ArtifactError
from poprt_lite.runtime import ModelRunner

from . import models

BERT = model_path("bert_qa_torchscript")
PACK = ["--input_shape", "input_ids=2,8", "--pack_args", "max_valid_num=4", "segment_max_size=8"]  # a packed model has static shapes


def convert(capsys, model: Path, out: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--input_model", str(model), "--output_dir", str(out), "--export_popef", "--quiet", *argv])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def assert_refused(capsys, model: Path, out: Path, message: str, *argv: str) -> None:
    """Exit code 2, exactly `error: <message>` on stderr, and nothing in the output folder."""
    code, _, err = convert(capsys, model, out, *argv)
    assert err == f"error: {message}\n"
    assert code == 2
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    # nothing beside the input either (the default output folder of a conversion)
    assert sorted(p.name for p in model.parent.iterdir() if p.name.startswith(".") or "poprt-lite" in p.name) == []


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path


def save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    """Save `model` with every initializer in the external file `location` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


@pytest.fixture
def src(tmp_path) -> Path:
    """The folder the bad models are written to (the output folder is a sibling)."""
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# --- files that are not ONNX models ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"this is not a protobuf", "DecodeError"),
        (bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)), "DecodeError"),
        (b"", "no graph found"),
        (b"PK\x05\x06" + bytes(18), "DecodeError"),  # an empty zip archive, e.g. an artifact by mistake
    ],
    ids=["text", "random-bytes", "empty", "zip"],
)
def test_file_that_is_not_onnx(capsys, src, out, content, reason):
    bogus = src / "model.onnx"
    bogus.write_bytes(content)
    if reason == "DecodeError":
        message = f"'{bogus}' is not a valid ONNX model (DecodeError); pass an .onnx file exported by torch.onnx or similar"
    else:
        message = f"'{bogus}' is not a valid ONNX model (no graph found); pass an .onnx file"
    assert_refused(capsys, bogus, out, message)


def test_truncated_protobuf(capsys, src, out):
    data = BERT.read_bytes()
    truncated = src / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    message = f"'{truncated}' is not a valid ONNX model (DecodeError); pass an .onnx file exported by torch.onnx or similar"
    assert_refused(capsys, truncated, out, message)


def test_missing_model_file(capsys, src, out):
    missing = src / "nope.onnx"
    assert_refused(capsys, missing, out, f"model file '{missing}' does not exist; check --input_model")


# --- graphs that are not valid ----------------------------------------------------------------


def test_cycle(capsys, src, out):
    path = save(models.cycle(), src / "cycle.onnx")
    message = f"'{path}' is not a valid ONNX model: its graph has a cycle ('add' -> 'relu' -> 'add'); an ONNX graph must be acyclic"
    assert_refused(capsys, path, out, message)
    assert_refused(capsys, path, out, message, *PACK)


def test_cycle_behind_other_nodes_is_named(src):
    """The named cycle is the cycle itself, not the nodes downstream of it."""
    model = models.cycle()
    first = onnx.helper.make_node("Relu", ["x"], ["x2"], name="pre")
    model.graph.node[0].input[0] = "x2"
    model.graph.node.insert(0, first)
    path = save(model, src / "cycle.onnx")
    with pytest.raises(Exception, match=r"its graph has a cycle \('add' -> 'relu' -> 'add'\)"):
        ir.load_model(path)


def test_dangling_input(capsys, src, out):
    path = save(models.dangling(), src / "dangling.onnx")
    message = f"'{path}' is not a valid ONNX model: node 'add_ghost' (Add) reads tensor 'ghost', which no node, graph input or initializer produces"
    assert_refused(capsys, path, out, message)


def test_tensor_produced_twice(capsys, src, out):
    model = models.tiny()
    model.graph.node.append(onnx.helper.make_node("Neg", ["x"], ["y"], name="second"))
    path = save(model, src / "twice.onnx")
    message = f"'{path}' is not a valid ONNX model: tensor 'y' is produced twice (by node 'the_node' and node 'second')"
    assert_refused(capsys, path, out, message)


def test_graph_output_nobody_produces(capsys, src, out):
    model = models.tiny()
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 3]))
    path = save(model, src / "no_output.onnx")
    assert_refused(capsys, path, out, f"'{path}' is not a valid ONNX model: graph output 'z' is produced by no node")


def test_unsorted_but_acyclic_graph_is_put_in_order(capsys, src, out):
    """Not an error: nodes written out of order are sorted on load, and the conversion succeeds."""
    model = models.encoder()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = save(model, src / "reversed.onnx")
    code, _, err = convert(capsys, path, out)
    assert (code, err) == (0, "")
    feeds = {"input_ids": np.array([[3, 4, 5]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    want = ort.InferenceSession(models.encoder().SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(str(out / "reversed.poprt-lite.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_op(capsys, src, out):
    path = save(models.tiny("FooBar"), src / "foobar.onnx")
    message = f"'{path}' uses op 'FooBar' (node 'the_node'), which is not an ONNX op at opset 13; poprt-lite converts standard ONNX models"
    assert_refused(capsys, path, out, message)


def test_op_newer_than_the_models_opset(capsys, src, out):
    """Gelu exists from opset 20: at opset 13 it is as unknown as FooBar."""
    path = save(models.tiny("Gelu"), src / "gelu.onnx")
    message = f"'{path}' uses op 'Gelu' (node 'the_node'), which is not an ONNX op at opset 13; poprt-lite converts standard ONNX models"
    assert_refused(capsys, path, out, message)


def test_opset_older_than_13(capsys, src, out):
    path = save(models.tiny(opset=11), src / "old.onnx")
    message = f"'{path}' uses opset 11; poprt-lite needs opset >= 13 (re-export with a newer opset_version)"
    assert_refused(capsys, path, out, message)


def test_invalid_input_is_blamed_on_the_input_not_on_a_pass(capsys, src, out):
    """A model the checker refuses (here: a graph input without a type) is reported as the input's
    fault, even though the first pass is what found it."""
    model = models.tiny()
    model.graph.input[0].type.Clear()
    path = save(model, src / "untyped.onnx")
    message = "the input model is invalid (no pass has run on it): Field 'type' of 'value_info' is required but missing."
    assert_refused(capsys, path, out, message)


# --- external data and the 2 GB limit ---------------------------------------------------------


def test_model_with_external_data_converts(capsys, src, out):
    path = save_external(models.encoder(), src / "ext.onnx")
    assert sorted(p.name for p in src.iterdir()) == ["ext.onnx", "weights.bin"]
    code, _, err = convert(capsys, path, out, *PACK)
    assert (code, err) == (0, "")
    assert sorted(p.name for p in out.iterdir()) == ["executable.popef", "ext.poprt-lite.onnx"]
    # the converted model and the artifact hold the weights themselves
    assert ir.load_model(out / "ext.poprt-lite.onnx").ByteSize() > 4 * models.VOCAB * models.HIDDEN
    artifact.load_artifact(out / "executable.popef")


def test_tensor_whose_data_does_not_fit_its_shape(capsys, src, out):
    model = models.encoder()
    table = model.graph.initializer[0]
    table.raw_data = table.raw_data[:-4]
    path = save(model, src / "short.onnx")
    need = models.VOCAB * models.HIDDEN * 4
    message = f"'{path}' is not a valid ONNX model: tensor '{table.name}' holds {need - 4} bytes, its type and shape [{models.VOCAB}, {models.HIDDEN}] need {need}"
    assert_refused(capsys, path, out, message)


def test_missing_external_data_file(capsys, src, out):
    path = save_external(models.encoder(), src / "ext.onnx")
    (src / "weights.bin").unlink()
    message = f"external data file '{src / 'weights.bin'}' of '{path}' is missing (tensor 'word_table'); keep the data file next to the model"
    assert_refused(capsys, path, out, message)


def test_truncated_external_data_file(capsys, src, out):
    path = save_external(models.encoder(), src / "ext.onnx")
    data = src / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    message = (
        f"external data of '{path}' is truncated: tensor 'word_table' needs {models.VOCAB * models.HIDDEN * 4} bytes "
        f"from offset 0, '{data}' holds 100"
    )
    assert_refused(capsys, path, out, message)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_external_data_outside_the_model_folder(capsys, src, out, location):
    model = onnx.load(save_external(models.encoder(), src / "ext.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path = save(model, src / "evil.onnx")
    message = f"external data of '{path}' (tensor 'word_table') points outside the model's folder ('{location}'); refusing to read it"
    assert_refused(capsys, path, out, message)


@pytest.fixture
def small_protobuf_limit(monkeypatch):
    """Pretend protobuf's limit is 1000 bytes, so the tiny models count as "over 2 GB"."""
    monkeypatch.setattr(ir, "PROTOBUF_LIMIT", 1000)


def test_save_model_over_the_limit_uses_external_data(tmp_path, small_protobuf_limit):
    model = models.encoder()
    before = model.SerializeToString()
    target = tmp_path / "big" / "m.onnx"
    ir.save_model(model, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    tables = (models.VOCAB + models.POSITIONS) * models.HIDDEN * 4  # the two embedding tables, at least
    assert target.stat().st_size < tables <= (target.parent / "m.onnx.data").stat().st_size
    # both files get the permissions of a plain open()
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in target.parent.iterdir()} == {0o666 & ~umask}
    # the caller's model keeps its weights (onnx moves them out while saving)
    assert model.SerializeToString() == before
    # saving again replaces the data file instead of failing or appending to it
    size = (target.parent / "m.onnx.data").stat().st_size
    ir.save_model(model, target)
    assert (target.parent / "m.onnx.data").stat().st_size == size
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = ir.load_model(target)
    assert {t.name: onnx.numpy_helper.to_array(t).tolist() for t in loaded.graph.initializer} == {
        t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer
    }


def test_cli_over_the_limit_writes_model_and_data_and_runs_twice(capsys, src, out, small_protobuf_limit):
    path = save_external(models.encoder(), src / "ext.onnx")
    for _ in range(2):  # a second run over the same output folder must work too
        code, _, err = main(["--input_model", str(path), "--output_dir", str(out), "--quiet", *PACK]), *capsys.readouterr()
        assert (code, err) == (0, "")
        assert sorted(p.name for p in out.iterdir()) == ["ext.poprt-lite.onnx", "ext.poprt-lite.onnx.data"]
    session = ort.InferenceSession(str(out / "ext.poprt-lite.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids", "unpack_info"]


def test_compile_over_the_limit_keeps_weights_in_the_result(src, out, small_protobuf_limit):
    path = save_external(models.encoder(), src / "ext.onnx")
    result = compile(path, output_dir=out, options=CompileOptions())
    assert all(not onnx.external_data_helper.uses_external_data(t) for t in result.model.graph.initializer)
    assert result.model.ByteSize() > 4 * models.VOCAB * models.HIDDEN


def test_artifact_over_the_limit_holds_the_weights_beside_the_model(capsys, src, out, small_protobuf_limit):
    """Over the limit the artifact keeps the weights in a stored member its model refers to; it
    loads, and runs like the converted model."""
    path = save_external(models.encoder(), src / "ext.onnx")
    code, _, err = convert(capsys, path, out, *PACK, "--input_shape", "attention_mask=2,8")
    assert (code, err) == (0, "")
    with zipfile.ZipFile(out / "executable.popef") as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert sorted(infos) == sorted([*artifact.MEMBERS, artifact.WEIGHTS_MEMBER])
    assert infos[artifact.WEIGHTS_MEMBER].compress_type == zipfile.ZIP_STORED
    loaded = artifact.load_artifact(out / "executable.popef")
    assert loaded.weights.nbytes == infos[artifact.WEIGHTS_MEMBER].file_size
    external = [t.name for t in loaded.model().graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert "word_table" in external
    converted = out / "ext.poprt-lite.onnx"
    graph = onnx.load(converted, load_external_data=False)
    requests = verify.make_requests(np.random.default_rng(0), [3, 8, 5], models.VOCAB)
    _, want = verify.run_packed(graph, requests, verify.session(converted))
    _, got = verify.run_packed(graph, requests, ModelRunner(loaded).session)
    assert len(got) == len(want) == 3
    for mine, theirs in zip(got, want, strict=True):
        np.testing.assert_array_equal(mine[0], theirs[0])


def test_failed_write_leaves_nothing(capsys, monkeypatch, src, out):
    """A write that fails half-way (disk full) is one line, and the half-written file is removed."""
    def disk_full(model, apart, stream):
        stream.write(model.SerializeToString()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    path = src / "m.onnx"
    path.write_bytes(models.encoder().SerializeToString())
    with monkeypatch.context() as patched:
        patched.setattr(ir, "write_model", disk_full)
        code, _, err = convert(capsys, path, out)
    target = out / "m.poprt-lite.onnx"
    assert err == f"error: cannot write '{target}' (No space left on device); check the output path and free space\n"
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == []


# --- models that cannot be packed -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask"])
def test_no_attention_refuses_packing(capsys, src, out, mode):
    path = save(models.encoder(attention=False), src / "no_attention.onnx")
    pass_name = {"unpack_repack": "pack_unpack_repack", "attention_mask": "attention_mask_packing"}[mode]
    message = f"pass '{pass_name}' failed: no attention blocks found (MatMul -> Softmax -> MatMul); packing needs a transformer encoder"
    assert_refused(capsys, path, out, message, *PACK, f"mode={mode}")


def test_no_attention_converts_without_packing(capsys, src, out):
    path = save(models.encoder(attention=False), src / "no_attention.onnx")
    code, _, err = convert(capsys, path, out)
    assert (code, err) == (0, "")


POSITION_IDS_NEEDED = (
    "pass 'pack_unpack_repack' failed: pack_unpack_repack needs 'position_ids' as a model input: "
    "run export_position_ids before it (--pack_args does), and if that finds no position-id computation, "
    "export the model with a 'position_ids' input"
)


def test_position_ids_already_an_input_under_another_name(capsys, src, out, tmp_path):
    """A real BERT whose position ids were exported as an input called `pos`."""
    renamed = src / "bert_pos.onnx"
    code = main(
        ["--input_model", str(BERT), "--output_model", str(renamed), "--quiet", "--pipeline", "export_position_ids",
         "--pass_option", "export_position_ids.position_ids_name=pos"]
    )
    capsys.readouterr()
    assert code == 0 and "pos" in [i.name for i in onnx.load(renamed).graph.input]
    assert_refused(capsys, renamed, out, POSITION_IDS_NEEDED, *PACK)


@pytest.mark.parametrize("position", ["input", "none"])
def test_position_id_pattern_absent(capsys, src, out, position):
    """Position ids as an input named `pos`, or no position embedding at all: packing needs
    position_ids (they restart at every request), so it is refused."""
    path = save(models.encoder(position=position), src / f"pos_{position}.onnx")
    assert_refused(capsys, path, out, POSITION_IDS_NEEDED, *PACK)


def test_real_cli_process_prints_one_line_and_exits_2(src, out):
    """The installed entry point, in its own process (no pytest log capture): no traceback."""
    path = save(models.cycle(), src / "cycle.onnx")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from poprt_lite.cli.main import main; sys.exit(main())",
         "--input_model", str(path), "--output_dir", str(out), "--export_popef"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: '{path}' is not a valid ONNX model: its graph has a cycle ('add' -> 'relu' -> 'add'); an ONNX graph must be acyclic\n"
    assert not out.exists()
