"""Issue 16, "No silent wrong answers": each case the issue lists, as written there, now gives the right
answer or a one-line error. (The systematic version, every model x mode x API, is test_differential.)

1. Offline packing of a RoBERTa-like model as the README showed it (`pack_data(datasets, idx, 4, 64, 8,
   1, across_rows)`, position_offset left at 0 while the manifest says 2).
2. Data packed with across_rows=True run through `Runner(path).run` on an AttentionMask artifact.
3. Compiles, then unusable: XLM-R (sdpa, TorchScript) with unpack_repack and --check; an output no
   runner can split (the safety net); --pack_args without --input_shape; segment_max_size=128 with rows
   of 64 in AttentionMask mode; --passes NAME with --pack_args and --input_shape (and --pipeline).
4. --check cannot fail a job: fp16, --quiet, a tolerance, nothing left behind.
5. Online outputs: with none given, execute / the future return them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import poprt_lite
from conftest import ROOT, TESTDATA, VOCAB, run
from poprt_lite import runtime
from poprt_lite.runtime import packing_utils
from poprt_lite.cli.main import main
from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.vocab import PackMode

PLUGINS = ROOT / "tests" / "plugins"
ROBERTA, BERT, XLMR = (TESTDATA / f"{name}.onnx" for name in ("roberta_qa", "bert_qa_torchscript", "xlmr_sdpa"))
MODES = {PackMode.unpack_repack: True, PackMode.attention_mask: False}  # mode -> across_rows


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def packed(tmp: Path, model: Path, mode: PackMode) -> Path:
    """The issue's artifact: batch 4 x 64, max_valid_num 8, segment_max_size 64."""
    options = poprt_lite.CompileOptions(
        input_shape={"input_ids": (4, 64)}, pack_args={"max_valid_num": "8", "segment_max_size": "64", "mode": mode.value}
    )
    out = tmp / f"{model.stem}_{mode}"
    return poprt_lite.compile(model, out / "model.onnx", output_dir=out, export_popef=True, options=options).artifact


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> dict[PackMode, Path]:
    tmp = tmp_path_factory.mktemp("roberta")
    return {mode: packed(tmp, ROBERTA, mode) for mode in MODES}


def dataset(seed: int = 0, lengths=(10, 20, 30, 15, 7, 40, 3)) -> list[SimpleNamespace]:
    """PopRT's dataset: objects with input_ids and input_len (RoBERTa takes no token types)."""
    rng = np.random.default_rng(seed)
    return [SimpleNamespace(input_ids=rng.integers(3, VOCAB, n), input_len=n) for n in lengths]


def alone(model: Path, request: SimpleNamespace) -> dict[str, np.ndarray]:
    ids = np.asarray(request.input_ids)[None]
    start, end = run(model, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return {"start_logits": start[0], "end_logits": end[0]}


def worst_diff(model: Path, datasets, batch, outputs: dict[str, np.ndarray], across_rows: bool) -> float:
    worst = 0.0
    for name, output in outputs.items():
        for spec, got in zip(batch.specs, packing_utils.unpack_outputs(batch, output, across_rows), strict=True):
            worst = max(worst, float(np.abs(got - alone(model, datasets[spec.index])[name]).max()))
    return worst


# -------------------------------------------------------------------- 1. RoBERTa offline, offset 2


@pytest.mark.parametrize("mode", MODES)
def test_case1_roberta_offline_packing_as_the_readme_showed_is_refused(roberta, mode):
    datasets, across_rows = dataset(), MODES[mode]
    runner = runtime.Runner(roberta[mode])
    assert runner.interface.position_offset == 2
    batch = packing_utils.pack_data(datasets, 0, 4, 64, 8, 1, across_rows)  # position_offset left at 0
    feeds = dict(batch.data)
    if across_rows:
        feeds["unpack_info"] = batch.unpack_info
    with pytest.raises(RequestError) as info:
        runner.run(None, feeds)
    assert str(info.value) == (
        "feed 'position_ids' starts request 0 (at row 0, column 0) at 0; the artifact's position ids start at 2 for "
        "each request: pack with position_offset=2 (pack_data(..., artifact=...) reads it from the artifact)"
    )


@pytest.mark.parametrize("mode", MODES)
def test_case1_roberta_offline_packing_is_right_with_the_artifact_or_the_offset(roberta, mode):
    datasets, across_rows = dataset(), MODES[mode]
    runner = runtime.Runner(roberta[mode])
    for arguments in (dict(artifact=roberta[mode]), dict(position_offset=2)):
        batch = packing_utils.pack_data(datasets, 0, 4, 64, 8, 1, across_rows, **arguments)
        feeds = {name: batch.data[name] for name in runner.inputs if name in batch.data}
        if across_rows:
            feeds["unpack_info"] = batch.unpack_info
        outputs = dict(zip(runner.output_names, runner.run(None, feeds), strict=True))
        assert worst_diff(ROBERTA, datasets, batch, outputs, across_rows) < 1e-5
        assert batch.count == len(datasets)
    answers = runner.run_requests([{"input_ids": r.input_ids} for r in datasets])
    for request, answer in zip(datasets, answers, strict=True):
        for name, want in alone(ROBERTA, request).items():
            np.testing.assert_allclose(answer[name], want, atol=1e-5, rtol=0)


def test_case1_an_offset_contradicting_the_artifact_is_refused(roberta):
    with pytest.raises(PoprtError) as info:
        packing_utils.pack_data(dataset(), 0, 4, 64, 8, 1, True, 0, artifact=roberta[PackMode.unpack_repack])
    assert str(info.value) == (
        f"position_offset=0 contradicts artifact '{roberta[PackMode.unpack_repack]}', compiled with (position_offset=2); "
        "leave position_offset out and the artifact's is used"
    )


# ------------------------------------------------------- 2. across_rows=True on an AttentionMask artifact


def test_case2_data_packed_for_unpack_repack_on_an_attention_mask_artifact_is_refused(tmp_path):
    artifact = packed(tmp_path, BERT, PackMode.attention_mask)
    datasets = dataset(lengths=(10, 20, 30, 15, 7))
    for request in datasets:
        request.token_type_ids = np.zeros(request.input_len, np.int64)
    batch = packing_utils.pack_data(datasets, 0, 4, 64, 8, 1, True)
    with pytest.raises(RequestError) as info:
        runtime.Runner(artifact).run(None, batch.data)
    assert str(info.value) == (
        "feed 'position_ids' jumps from 9 to 0 at row 0, column 10, inside request 0 of the feeds (64 tokens from row 0, "
        "column 0, as the segment ids of attention_mask place it): several requests share one segment id; this artifact "
        "(attention_mask mode) takes each request inside one row with its own segment id: pack with across_rows=False, "
        "or with pack_data(..., artifact=...)"
    )


# ------------------------------------------------------------------------ 3. compiles, then unusable


def test_case3_xlmr_sdpa_unpack_repack_compiles_and_checks(tmp_path, capsys):
    code, out, err = cli(
        capsys, "--input_model", XLMR, "--output_dir", tmp_path, "--input_shape", "input_ids=4,64", "--pack_args",
        "max_valid_num=8", "segment_max_size=64", "--export_popef", "--check", "--quiet",
    )
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("check: ok: max abs diff ")
    with zipfile.ZipFile(tmp_path / "executable.popef") as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert [(o["name"], o["layout"]) for o in manifest["outputs"]] == [("last_hidden_state", "unpacked")]


def model_with_a_shape_output(tmp_path: Path) -> Path:
    """BERT QA plus an output that is neither per token nor per request: Shape(input_ids)."""
    model = onnx.load(BERT)
    model.graph.node.append(helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="the_shape"))
    model.graph.output.append(helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2]))
    path = tmp_path / "bert_shape.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_case3_an_output_no_runner_can_split_is_refused_naming_output_and_node(tmp_path, capsys, mode):
    source, out = model_with_a_shape_output(tmp_path), tmp_path / "out"
    code, _, err = cli(
        capsys, "--input_model", source, "--output_dir", out, "--input_shape", "input_ids=4,64", "--pack_args",
        "max_valid_num=8", "segment_max_size=64", f"mode={mode}", "--export_popef",
    )
    assert (code, err) == (
        2,
        "error: output 'ids_shape' (produced by node 'the_shape' (Shape)) holds neither per-token nor per-request values "
        "of a packed batch, so no runner can split it per request; remove it from the packed model (remove_outputs ids_shape)\n",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--pack_args", "max_valid_num=8", "segment_max_size=64"],
            "error: a packed model needs static shapes, but input 'input_ids' has shape [batch, sequence]: give "
            "input_shape input_ids=B,S (the batch's rows and their length, e.g. input_ids=16,256)\n",
        ),
        (
            ["--input_shape", "input_ids=4,64", "--pack_args", "max_valid_num=8", "segment_max_size=128", "mode=attention_mask"],
            "error: segment_max_size=128 does not fit a row of input 'input_ids' [4, 64]: in attention_mask mode a request "
            "lies inside one row; use pack_args segment_max_size<=64 or input_shape input_ids=4,128\n",
        ),
        (
            ["--input_shape", "input_ids=4,64", "--pack_args", "max_valid_num=8", "segment_max_size=64", "--pipeline", "eliminate_identity"],
            "error: the pipeline (eliminate_identity) has no static_shape, which input_shape needs: add static_shape to it, "
            "or drop input_shape (or give no pipeline: the default one runs what the options ask for)\n",
        ),
        (
            ["--input_shape", "input_ids=4,64", "--pack_args", "max_valid_num=8", "segment_max_size=64", "--pipeline",
             "eliminate_identity,static_shape"],
            "error: the pipeline (eliminate_identity, static_shape) has no pack_unpack_repack, which pack_args needs: add "
            "pack_unpack_repack to it, or drop pack_args (or give no pipeline: the default one runs what the options ask for)\n",
        ),
    ],
    ids=["no-input-shape", "segment-over-the-row", "pipeline-without-static-shape", "pipeline-without-packing"],
)
def test_case3_unusable_artifacts_are_refused_and_nothing_is_written(tmp_path, capsys, argv, message):
    code, out, err = cli(capsys, "--input_model", BERT, "--output_dir", tmp_path / "out", *argv, "--export_popef")
    assert (code, err) == (2, message)
    assert not (tmp_path / "out").exists()


def test_case3_passes_name_with_pack_args_and_input_shape_packs_with_static_shapes(tmp_path, capsys):
    """PopRT's --passes adds to the default pipeline: packing and static shapes still run."""
    code, out, err = cli(
        capsys, "--input_model", BERT, "--output_dir", tmp_path, "--input_shape", "input_ids=4,64", "--pack_args",
        "max_valid_num=8", "segment_max_size=64", "--passes", "eliminate_identity", "--export_popef", "--check", "--quiet",
    )
    assert (code, err) == (0, "")
    runner = runtime.Runner(tmp_path / "executable.popef")
    assert runner.interface.mode is PackMode.unpack_repack and (runner.interface.batch_size, runner.interface.seq_len) == (4, 64)


# ------------------------------------------------------------------------------ 4. --check as a gate


def test_case4_fp16_check_prints_the_figure_with_quiet_and_passes_its_default_tolerance(tmp_path, capsys):
    code, out, err = cli(capsys, "--input_model", BERT, "--output_dir", tmp_path, "--precision", "fp16", "--check", "--quiet")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split(" max abs diff ")[0] for line in lines[:2]] == ["check: start_logits", "check: end_logits"]
    worst = max(float(line.rsplit(" ", 1)[1]) for line in lines[:2])
    assert 1e-4 < worst < 0.05  # fp16 rounding: above fp32's tolerance, below fp16's
    assert lines[2] == f"check: ok: max abs diff {worst:.3g} <= atol 0.05"
    assert (tmp_path / "bert_qa_torchscript.poprt-lite.onnx").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["--precision", "fp16", "--check_atol", "1e-4"],
        ["--plugin", PLUGINS / "scale_outputs.py", "--passes", "scale_outputs", "--pass_option", "scale_outputs.scale=2", "--check"],
        ["--plugin", PLUGINS / "scale_outputs.py", "--passes", "scale_outputs", "--pass_option", "scale_outputs.scale=nan", "--check"],
    ],
    ids=["fp16-below-its-error", "scaled-outputs", "nan-outputs"],
)
def test_case4_check_above_the_tolerance_exits_1_and_writes_nothing(tmp_path, capsys, argv):
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, "--input_model", BERT, "--output_dir", out_dir, "--export_popef", "--quiet", *argv)
    assert code == 1
    verdict = out.splitlines()[-1]
    assert verdict.startswith("check: FAILED: max abs diff ") and " > atol " in verdict
    assert err.startswith("error: check failed: max abs diff ") and err.endswith("; nothing written\n") and err.count("\n") == 1
    assert not out_dir.exists()


# ----------------------------------------------------------------------------- 5. online outputs


@pytest.mark.parametrize("outputs", [None, {}], ids=["none", "empty"])
def test_case5_online_outputs_are_allocated_and_returned(roberta, outputs):
    datasets = dataset(lengths=(12, 40))
    with runtime.Runner(roberta[PackMode.attention_mask], runtime.PackRunnerConfig(timeout_microseconds=1000)) as runner:
        future = runner.execute_async({"input_ids": datasets[0].input_ids}, outputs)
        direct = runner.execute({"input_ids": datasets[1].input_ids}, outputs)
        for request, result in zip(datasets, (future.result(timeout=60), direct), strict=True):
            assert sorted(result) == ["end_logits", "start_logits"]
            for name, want in alone(ROBERTA, request).items():
                assert result[name].shape == (request.input_len,)
                np.testing.assert_allclose(result[name], want, atol=1e-5, rtol=0)


def test_case3_a_per_token_output_without_the_batchs_token_dims_is_refused(tmp_path):
    """The safety net behind the passes' layouts: an output recorded as packed must be [B, S, ...]."""
    from poprt_lite import ir, vocab
    from poprt_lite.compiler.servable import check_servable

    source = model_with_a_shape_output(tmp_path)
    options = poprt_lite.CompileOptions(input_shape={"input_ids": (4, 64)}, pack_args={"max_valid_num": "8", "segment_max_size": "64"})
    with pytest.raises(PoprtError, match="output 'ids_shape'"):
        poprt_lite.compile(source, save=False, options=options)
    model = poprt_lite.compile(BERT, save=False, options=options).converted.to_proto()
    model.graph.output.append(helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2]))
    model.graph.node.append(helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="the_shape"))
    ir.set_metadata(model, vocab.LAYOUT_PREFIX + "ids_shape", vocab.Layout.packed.value)
    with pytest.raises(PoprtError) as info:
        check_servable(model)
    assert str(info.value) == (
        "output 'ids_shape' (produced by node 'the_shape' (Shape)) has shape [2], not one value per token of the packed "
        "batch [4, 64, ...], so no runner can split it per request; remove it from the packed model (remove_outputs ids_shape)"
    )


def test_case5_the_readme_offline_example_runs(tmp_path, monkeypatch, capsys):
    """The README documents the offline API with a complete example: it runs as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Offline: a whole set of requests") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    (tmp_path / "testdata").symlink_to(TESTDATA)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.splitlines()[0] == "(40,)"
    assert (tmp_path / "out" / "executable.popef").is_file()


def test_case5_the_plain_runner_returns_its_outputs(roberta):
    runner = runtime.Runner(roberta[PackMode.unpack_repack])
    batch = packing_utils.pack_data(dataset(), 0, 4, 64, 8, artifact=runner)
    returned = runner.execute(batch.data)  # no output arrays: all outputs, new arrays
    assert sorted(returned) == ["end_logits", "start_logits"] and returned["start_logits"].shape == (8, 64)
    mine = {"start_logits": np.zeros((8, 64), np.float32)}
    assert runner.execute(batch.data, mine) is mine
    np.testing.assert_array_equal(mine["start_logits"], returned["start_logits"])
