"""PopRT's own command lines, pass files, flags and YAML configs run on poprt-lite unchanged.

The three conversions of PopRT's packed BERT example (graphcore/PopRT,
examples/packed_bert_example/run.sh) run verbatim, `poprt` replaced by `poprt-lite`, on the tiny
BERT with a position_ids input; the example's logic (examples/packed_bert, its port) then runs on
the three models.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import model_path
from poprt_lite import compile, ir
from poprt_lite.cli import poprt_flags
from poprt_lite.cli.main import main
from poprt_lite.compiler import CompileOptions

ROOT = Path(__file__).resolve().parents[2]
SHAPES = "--input_shape input_ids=16,256 attention_mask=16,256 token_type_ids=16,256 position_ids=16,256"
RUN_SH = [  # examples/packed_bert_example/run.sh, as PopRT ships it
    f"poprt --input_model bert_base_squad_pos.onnx --output_model squad_bert_base_bs16_sl256.onnx --precision fp16 {SHAPES}",
    f"poprt --input_model bert_base_squad_pos.onnx --output_model squad_bert_base_bs16_sl256_pack.onnx --precision fp16 {SHAPES} "
    "--pack_args max_valid_num=40 segment_max_size=256 head_pattern='s:0->MatMul:1->Add:2->Split:3->Squeeze:4->e:5',"
    "'Split:3->Squeeze:6->e:7' dynamic_groups=[[input_ids,]]",
    f"poprt --input_model bert_base_squad_pos.onnx --output_model squad_bert_custom_attention_mask.onnx --precision fp16 {SHAPES} "
    "--passes insert_attention_mask",
]
OUTPUTS = ["squad_bert_base_bs16_sl256.onnx", "squad_bert_base_bs16_sl256_pack.onnx", "squad_bert_custom_attention_mask.onnx"]


@pytest.fixture(scope="module")
def run_sh(tmp_path_factory):
    """PopRT's prepared model (position_ids as an input), then run.sh's three conversions."""
    folder = tmp_path_factory.mktemp("run_sh")
    source = compile(model_path("bert_qa_torchscript"), folder / "bert_base_squad_pos.onnx", options=CompileOptions(pipeline=["export_position_ids"]))
    assert "position_ids" in [i.name for i in ir.load_model(source.output_model).graph.input]
    codes = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for line in RUN_SH:
            argv = shlex.split(line)
            assert argv[0] == "poprt"
            codes.append(main(argv[1:] + ["--quiet"]))
    return folder, codes


def test_run_sh_converts_the_three_models(run_sh):
    folder, codes = run_sh
    assert codes == [0, 0, 0]
    models = [ir.load_model(folder / name) for name in OUTPUTS]
    ops = [{n.op_type for n in m.graph.node} for m in models]
    assert "AttentionMask" not in ops[0] and "Unpack" not in ops[0]
    assert {"Unpack", "Repack"} <= ops[1]
    assert "AttentionMask" in ops[2] and "Unpack" not in ops[2]
    assert [i.name for i in models[1].graph.input][-1] == "unpack_info"
    assert ir.get_metadata(models[2])["pack"] == '{"mode": "attention_mask", "max_valid_num": 4096, "segment_max_size": 256}'


def test_insert_attention_mask_gives_the_attention_mask_mode_graph(run_sh, capsys, monkeypatch):
    folder, _ = run_sh
    monkeypatch.chdir(folder)
    reference = folder / "reference_attention_mask.onnx"
    argv = shlex.split(RUN_SH[0])[1:] + ["--output_model", str(reference), "--pack_args", "max_valid_num=40", "segment_max_size=256", "mode=attention_mask", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["diff", str(reference), str(folder / OUTPUTS[2]), "--ignore", "metadata"]) == 0, capsys.readouterr().out
    assert main(["diff", str(reference), str(folder / OUTPUTS[2])]) == 1  # max_valid_num: 40 given, 16*256 derived


def test_pack_args_notices_name_each_popRT_key_once(run_sh, tmp_path, caplog, monkeypatch):
    folder, _ = run_sh
    monkeypatch.chdir(folder)
    argv = shlex.split(RUN_SH[1])[1:] + ["--output_model", str(tmp_path / "x.onnx")]
    argv[argv.index("dynamic_groups=[[input_ids,]]")] = "dynamic_groups=[[input_ids,attention_mask]]"
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "pack_args" in r.getMessage()]
    assert notices == [
        "--pack_args head_pattern: not needed: poprt-lite finds the model's head and each output's layout by the graph's structure",
        "--pack_args dynamic_groups: packs by 'input_ids'; attention_mask follow it by their role (no need to list them)",
    ]


def _load_example():
    script = ROOT / "examples" / "packed_bert" / "packed_bert_example.py"
    spec = importlib.util.spec_from_file_location("packed_bert_example_for_run_sh", script)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up
    spec.loader.exec_module(example)
    return example


RUN_NAMES = [
    "Original (padded)", "Pack Offline Unpack Repack", "Pack Online Unpack Repack", "Pack Offline AttentionMask",
    "Pack Online AttentionMask(first_fit)", "Pack Online AttentionMask(next_fit)",
]


def record_example_runs(example, monkeypatch) -> tuple[list, dict]:
    """The example's requests and its runs (name -> per request, each output's values), recorded as
    main() makes and compares them, to check beyond the example's own comparison with its padded run."""
    datasets, runs = [], {}
    make, compare = example.synthetic_dataset, example.mean_absolute_errors

    def synthetic_dataset(args):
        datasets.extend(make(args))
        return datasets

    def mean_absolute_errors(expected, actual):
        runs.update({expected.name: expected.outputs, actual.name: actual.outputs})
        return compare(expected, actual)

    monkeypatch.setattr(example, "synthetic_dataset", synthetic_dataset)
    monkeypatch.setattr(example, "mean_absolute_errors", mean_absolute_errors)
    return datasets, runs


def max_error_against_the_source(datasets, runs) -> float:
    """The largest difference, over every run, request, output and token, from the source model
    (testdata/bert_qa_torchscript.onnx, float32) run on that request alone, unpadded."""
    session = ort.InferenceSession(str(model_path("bert_qa_torchscript")), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for k, data in enumerate(datasets):
        feeds = {name: getattr(data, name)[None].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
        want = dict(zip(names, (value[0] for value in session.run(None, feeds)), strict=True))
        for outputs in runs.values():
            assert set(outputs[k]) == set(want)
            for name, value in want.items():
                assert outputs[k][name].shape == value.shape
                worst = max(worst, float(np.abs(outputs[k][name].astype(np.float64) - value).max()))
    return worst


def test_packed_bert_example_runs_on_the_run_sh_models(run_sh, capsys, monkeypatch):
    """The example's own check (MAE against its padded run), and every run's every token against the
    float32 source model run alone: the largest error (measured: at most 2e-3)."""
    folder, _ = run_sh
    example = _load_example()
    datasets, runs = record_example_runs(example, monkeypatch)
    args = [
        "--model_without_packing", str(folder / OUTPUTS[0]), "--model_with_packing_unpack_repack", str(folder / OUTPUTS[1]),
        "--model_with_packing_attention_mask", str(folder / OUTPUTS[2]), "--precision", "fp16",
        "--iterations", "2", "--latency_requests", "2", "--timeout_microseconds", "2000",
    ]
    code = example.main(args)
    out = capsys.readouterr().out
    summary = out[out.index("Summary"):]
    rows = re.findall(r"^(.+?)\s+[\d.]+\s+[\d.]+x\s+([\d.e+-]+)\s+([\d.e+-]+)$", summary, re.M)
    assert [name.strip() for name, _, _ in rows] == RUN_NAMES
    maes = [float(v) for _, start, end in rows for v in (start, end)]
    assert max(maes) < 1e-3, summary
    assert code == 0
    assert sorted(runs) == sorted(RUN_NAMES) and len(datasets) == 2 * 16
    assert max_error_against_the_source(datasets, runs) < 1e-2


def test_attention_mask_runtime_takes_max_valid_num_from_the_config(tmp_path, capsys):
    """PopRT's AttentionMask model has no max_valid_num: its PackRunnerConfig sets it, so a config may
    lower the cap derived at conversion (never raise it, and never change an unpack/repack model's)."""
    from poprt_lite import runtime
    from poprt_lite.errors import PoprtError

    argv = ["--input_model", str(model_path("bert_qa_torchscript")), "--output_dir", str(tmp_path), "--export_popef", "--quiet",
            "--input_shape", "input_ids=2,16", "attention_mask=2,16", "token_type_ids=2,16", "--passes", "insert_attention_mask"]
    assert main(argv) == 0
    popef = tmp_path / "executable.popef"
    config = runtime.PackRunnerConfig(timeout_microseconds=200_000, max_valid_num=2)
    config.enable_input_single_row_mode("attention_mask")
    rng = np.random.default_rng(0)
    with runtime.Runner(popef, config) as runner:
        futures = [runner.execute_async({"input_ids": rng.integers(1, 900, 3)}) for _ in range(8)]
        for future in futures:
            future.result()
        stats = runner.stats
    assert stats.requests == 8 and stats.batches >= 4  # 2 rows of 16 hold 8 such requests: the cap of 2 splits them
    too_many = runtime.PackRunnerConfig(max_valid_num=2 * 16 + 1)
    with pytest.raises(PoprtError, match=r"^max_valid_num=33 contradicts the artifact, compiled with max_valid_num=32; leave it unset or recompile$"):
        runtime.Runner(popef, too_many)


PLUGINS = ROOT / "tests" / "plugins"


def test_popRT_pass_files_run_through_custom_pass_config_and_passes(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["--input_model", str(model_path("bert_qa_torchscript")), "--output_model", str(out), "--custom_pass_config",
            f"{PLUGINS / 'replace_add_with_sub.py'},{PLUGINS / 'poprt_call_style.py'}", "--passes", "replace_add_with_sub,rename_outputs_upper",
            "--precision", "fp16"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    order = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│") and line.split("│")[1].strip()]
    assert order == ["eliminate_identity", "fold_constants", "eliminate_dead_code", "replace_add_with_sub", "rename_outputs_upper", "float_to_half"]
    model = ir.load_model(out)
    ops = [n.op_type for n in model.graph.node]
    assert "Add" not in ops and "Sub" in ops
    assert [o.name for o in model.graph.output] == ["START_LOGITS", "END_LOGITS"]


def test_popRT_pass_class_is_callable_on_a_model_and_registered():
    import poprt_lite
    from poprt_lite.passes import get_pass, load_plugin

    assert load_plugin(str(PLUGINS / "replace_add_with_sub.py")) == ["replace_add_with_sub"]
    assert "replace_add_with_sub" in poprt_lite.get_registered_passes()
    model = ir.load_model(model_path("bert_qa_torchscript"))
    adds = sum(n.op_type == "Add" for n in model.graph.node)
    edited = get_pass("replace_add_with_sub").target()(model)  # PopRT: SomePass()(onnx_model)
    assert adds > 0 and sum(n.op_type == "Add" for n in edited.graph.node) == 0
    folded = get_pass("constant_folding")()(ir.load_model(model_path("bert_qa_torchscript")))  # a built-in pass, by its PopRT name
    assert len(folded.graph.node) < len(model.graph.node)


def test_a_popRT_pass_returning_no_model_is_one_line(tmp_path, capsys):
    plugin = tmp_path / "bad_pass.py"
    plugin.write_text("from poprt_lite.passes import Pass, register\n\n@register('forgets_return')\nclass Forgets(Pass):\n    \"\"\"Forget to return the model.\"\"\"\n\n    def run(self, onnx_model):\n        onnx_model.doc_string = 'x'\n")
    argv = ["--input_model", str(model_path("bert_qa_torchscript")), "--output_dir", str(tmp_path / "o"), "--custom_pass_config", str(plugin), "--passes", "forgets_return"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: pass 'forgets_return' failed: Forgets returned NoneType; a PopRT-style pass must return the onnx.ModelProto\n"


def test_skip_passes_and_remove_outputs(tmp_path, capsys, caplog):
    out = tmp_path / "m.onnx"
    with caplog.at_level(logging.WARNING):
        code = main(["--input_model", str(model_path("bert_qa_torchscript")), "--output_model", str(out), "--skip_passes", "constant_folding,float_to_half",
                     "--remove_outputs", "end_logits", "--export_popef", "--output_dir", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.onnx").with_suffix("").exists()
    from poprt_lite import load_artifact

    manifest = load_artifact(tmp_path / "executable.popef").manifest
    assert [p["name"] for p in manifest["pipeline"]] == ["eliminate_identity", "remove_outputs", "eliminate_dead_code"]
    assert [o["name"] for o in manifest["outputs"]] == ["start_logits"]
    assert [r.getMessage() for r in caplog.records] == [
        "--skip_passes float_to_half: not in the pipeline (eliminate_identity, remove_outputs, eliminate_dead_code), nothing to skip"
    ]


def test_output_model_is_placed_in_output_dir_as_in_popRT(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--input_model", str(model_path("bert_qa_torchscript")), "--output_model", "m.onnx", "--output_dir", "out", "--quiet"]) == 0
    assert (tmp_path / "out" / "m.onnx").is_file() and not (tmp_path / "m.onnx").exists()


def test_config_yaml_gives_the_flags_and_the_command_line_overrides_it(tmp_path, capsys, caplog):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"input_model: '{model_path('bert_qa_torchscript')}'\noutput_dir: '{tmp_path / 'out'}'\noutput_model: m.onnx\n"
        "export_popef: True\nprecision: fp16\nipu_version: ipu21\n"
        "input_shape: {input_ids: [2, 16], attention_mask: [2, 16], token_type_ids: [2, 16]}\npasses: insert_attention_mask\n"
        "pack_args: {max_valid_num: 8}\n"
    )
    with caplog.at_level(logging.WARNING):
        assert main(["--config_yaml", str(config), "--precision", "fp32"]) == 0
    from poprt_lite import load_artifact

    manifest = load_artifact(tmp_path / "out" / "executable.popef").manifest
    assert manifest["precision"] == "fp32"
    assert manifest["pack"] == {"mode": "attention_mask", "max_valid_num": 8, "segment_max_size": 16}
    assert (tmp_path / "out" / "m.onnx").is_file()
    assert "--ipu_version does not apply, ignored: it selects the IPU generation; poprt-lite runs on onnxruntime's CPU provider" in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_fusion:\n  - input_model: a.onnx\n", "model_fusion is not supported: it fuses several models into one IPU executable; convert each model and run one runner per model"),
        ("colour: red\n", "unknown key 'colour'; keys are flag names without dashes, e.g. input_model, input_shape, precision"),
        ("- a\n- b\n", "must be a mapping of flag names to values, got a list"),
        ("eightbitsio: true\n", None),
        ("max_tensor_size: many\n", "bad value for max_tensor_size: "),
    ],
)
def test_bad_config_yaml_is_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["--input_model", str(model_path("bert_qa_torchscript")), "--config_yaml", str(config)]) == 2
    err = capsys.readouterr().err
    expected = f"error: --eightbitsio is not supported: {poprt_flags.BY_NAME['eightbitsio'].why}" if message is None else f"error: config file '{config}'"
    assert err.startswith(expected) and (message is None or message in err) and err.count("\n") == 1, err


def test_checkpoints_add_intermediate_tensors_to_the_outputs(tmp_path, capsys):
    from poprt_lite.compiler.verify import max_abs_diff

    source = ir.load_model(model_path("bert_qa_torchscript"))
    add = next(n for n in source.graph.node if n.op_type == "Add")
    layer_norm = next(n for n in source.graph.node if n.op_type == "LayerNormalization")
    out = tmp_path / "m.onnx"
    argv = ["--input_model", str(model_path("bert_qa_torchscript")), "--output_model", str(out), "--checkpoints",
            f"{add.output[0]},{layer_norm.output[0]}", "--precision", "fp16", "--quiet"]
    assert main(argv) == 0
    model = ir.load_model(out)
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"start_logits": 1, "end_logits": 1, add.output[0]: 1, layer_norm.output[0]: 1}
    with_checkpoints = onnx.ModelProto()
    with_checkpoints.CopyFrom(source)
    with_checkpoints.graph.output.extend(onnx.helper.make_tensor_value_info(n, 1, None) for n in (add.output[0], layer_norm.output[0]))
    diffs = max_abs_diff(with_checkpoints, model)
    assert set(diffs) == set(outputs) and max(diffs.values()) < 0.05  # fp16 against fp32, per checkpoint


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoints", "nope"], "error: pass 'add_checkpoints' failed: add_checkpoints names 'nope', which is no tensor of the model; name a tensor a node computes\n"),
        (["--checkpoints", "x", "--pack_args", "max_valid_num=4", "segment_max_size=32"],
         "error: checkpoints: intermediate tensors of a packed model could not be split per request; convert without packing to compare them\n"),
    ],
)
def test_bad_checkpoints_are_one_line(tmp_path, capsys, argv, message):
    assert main(["--input_model", str(model_path("bert_qa_torchscript")), "--output_dir", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err == message
