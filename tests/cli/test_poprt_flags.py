"""Every flag of PopRT 1.5's `poprt` command is implemented, accepted with a notice, or refused with
a one-line reason, and the README's table says which."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from poprt_lite.cli import poprt_flags
from poprt_lite.cli.main import main
from poprt_lite.cli.poprt_flags import FLAGS, IMPLEMENTED, NOTICE, REFUSED, SWITCH, VALUES

README = Path(__file__).resolve().parents[2] / "README.md"

# PopRT 1.5 user guide, "4. Command line interface", the usage block as printed there.
POPRT_USAGE = """
usage: poprt [-h] [--apply_hcsr APPLY_HCSR [APPLY_HCSR ...]] [--available_memory_proportion AVAILABLE_MEMORY_PROPORTION]
 [--batch_size BATCH_SIZE] [--batch_axis BATCH_AXIS] [--batches_per_step BATCHES_PER_STEP] [--calibration_with_data]
 [--calibration_loss_type {mse,mae,snr,kld,cos_dist,gptq}] [--check] [--checkpoints CHECKPOINTS]
 [--compiler_options KEY=VAL [KEY=VAL ...]] [--config_yaml CONFIG_YAML] [--convert_version CONVERT_VERSION]
 [--custom_library_so_paths CUSTOM_LIBRARY_SO_PATHS [CUSTOM_LIBRARY_SO_PATHS ...]] [--custom_pass_config CUSTOM_PASS_CONFIG]
 [--custom_shape_inference CUSTOM_SHAPE_INFERENCE] [--data_preprocess DATA_PREPROCESS] [--disable_compilation_progress_bar]
 [--disable_fast_norm] [--eightbitsio] [--merge_if_with_same_cond] [--enable_compress_pattern] [--enable_erf_gelu]
 [--enable_insert_remap] [--export_popef] [--fold_periodic_initializer] [--fp16_skip_op_types FP16_SKIP_OP_TYPES]
 [--enable_avoid_overflow_patterns] [--fp8_skip_op_names FP8_SKIP_OP_NAMES] [--fp8_params FP8_PARAMS] [--framework FRAMEWORK]
 [--infer_shape_ahead] [-i INPUT_MODEL] [--input_shape INPUT_TENSOR_NAME = INPUT_SHAPE [INPUT_TENSOR_NAME = INPUT_SHAPE ...]]
 [--ipu_version {ipu2,ipu21}] [--list_all_passes] [--logging_level {DEBUG,INFO,WARNING,ERROR,CRITICAL}]
 [--manual_sharding_config MANUAL_SHARDING_CONFIG] [--max_tensor_size MAX_TENSOR_SIZE] [--num_io_tiles NUM_IO_TILES]
 [--num_of_layers_keep_fp16 NUM_OF_LAYERS_KEEP_FP16] [--only_manual_sharding] [--optimize_internal_exchange_code]
 [--output_dir OUTPUT_DIR] [--output_model OUTPUT_MODEL] [--pack_args KEY=VAL [KEY=VAL ...]] [--passes PASSES] [--perf_tuner]
 [--popart_options KEY=VAL [KEY=VAL ...]] [--precision {fp32,fp16,fp8,fp8_weight}] [--precision_compare]
 [--print_completion {bash,zsh}] [--remap_mode REMAP_MODE] [--remove_outputs REMOVE_OUTPUTS] [--run]
 [--serialize_matmul KEY=VAL [KEY=VAL ...]] [--serialize_matmul_add KEY=VAL [KEY=VAL ...]] [--merge_matmul MERGE_MATMUL]
 [--merge_matmul_add MERGE_MATMUL_ADD] [--merge_moe MERGE_MOE] [--show] [--show_io_stat] [--skip_passes SKIP_PASSES] [-v]
 {tf2onnx} ...
"""


def test_the_table_covers_popRT_s_whole_list():
    documented = set(re.findall(r"\[(--\w+)", POPRT_USAGE)) | {"--input_model", "--version", "tf2onnx"}  # -i, -v, {tf2onnx}
    assert {flag.flag for flag in FLAGS} == documented
    assert len({flag.flag for flag in FLAGS}) == len(FLAGS)


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.flag)
def test_readme_table_says_what_poprt_lite_does(flag):
    status = {IMPLEMENTED: "implemented", NOTICE: "accepted, notice", REFUSED: "refused"}[flag.status]
    assert f"| `{flag.flag}` | {status} | {flag.why.replace('|', '/')} |" in README.read_text()


def _given(flag) -> list[str]:
    return {SWITCH: [flag.flag], VALUES: [flag.flag, "a=1", "b=2"]}.get(flag.takes, [flag.flag, "x"])


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.status == NOTICE], ids=lambda f: f.flag)
def test_ignored_flag_prints_one_notice_and_runs(flag, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["--version", *_given(flag)]) == 0
    assert capsys.readouterr().out == "poprt-lite 0.1.0\n"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [f"{flag.flag} does not apply, ignored: {flag.why}"]


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.status == REFUSED], ids=lambda f: f.flag)
def test_refused_flag_is_one_line_with_its_reason(flag, capsys):
    argv = [flag.flag, "x"] if flag.flag == "tf2onnx" else ["--version", *_given(flag)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {flag.flag} is not supported: {flag.why}\n")


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.status == IMPLEMENTED], ids=lambda f: f.flag)
def test_implemented_flag_is_a_declared_option(flag, capsys):
    assert main(["convert", "--help"]) == 0
    assert f" {flag.flag} " in capsys.readouterr().out.replace("\n", " ")


def test_a_refused_flag_stops_before_any_notice_or_work(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code = main(["--input_model", "no/such.onnx", "--ipu_version", "ipu21", "--eightbitsio"])
    assert code == 2 and caplog.records == []
    assert capsys.readouterr().err == f"error: --eightbitsio is not supported: {poprt_flags.BY_NAME['eightbitsio'].why}\n"
