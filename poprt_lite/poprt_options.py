"""Every option of PopRT 1.5's `poprt` command (and of `poprt.Converter`), and what poprt-lite does with it.

`FLAGS` lists them all (PopRT 1.5 user guide, "Command line interface"), each `implemented`,
`notice` (accepted, with a one-line notice saying why it does not apply on onnxruntime) or
`refused` (a one-line error with the reason and what to do instead). The CLI declares them
(cli/poprt_flags.py, cli/convert.py); `Converter` (converter.py) takes the same names as keywords.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poprt_lite.errors import PoprtError

log = logging.getLogger(__name__)

IMPLEMENTED, NOTICE, REFUSED = "implemented", "notice", "refused"
SWITCH, VALUE, VALUES = "switch", "value", "values"  # what a flag takes: nothing, one value, several


@dataclass(frozen=True)
class PoprtFlag:
    flag: str
    takes: str
    status: str
    why: str  # implemented: how poprt-lite does it; notice / refused: the one-line reason

    @property
    def name(self) -> str:
        return self.flag.lstrip("-")


FP8 = "FP8 is an IPU number format and onnxruntime's CPU provider has no FP8 MatMul; use --precision fp16 or fp32"
IPU_TUNING = "it tunes named MatMuls for IPU memory and cycles; onnxruntime picks its own kernels"

FLAGS = (
    PoprtFlag("--apply_hcsr", VALUES, REFUSED, "merges inputs into one host-concatenated input for IPU transfers, which changes the model's interface; poprt-lite keeps the inputs as they are"),
    PoprtFlag("--available_memory_proportion", VALUE, NOTICE, "it sets the IPU on-chip memory for MatMul/Conv/Gemm; a CPU has no such budget"),
    PoprtFlag("--batch_size", VALUE, REFUSED, "give each input's whole shape with --input_shape NAME=B,S (poprt-lite pins shapes per input)"),
    PoprtFlag("--batch_axis", VALUE, REFUSED, "give each input's whole shape with --input_shape NAME=B,S (poprt-lite pins shapes per input)"),
    PoprtFlag("--batches_per_step", VALUE, NOTICE, "it is the IPU's device loop; one onnxruntime run is one batch"),
    PoprtFlag("--calibration_with_data", SWITCH, REFUSED, f"calibrates FP8: {FP8}"),
    PoprtFlag("--calibration_loss_type", VALUE, REFUSED, f"calibrates FP8: {FP8}"),
    PoprtFlag("--check", SWITCH, IMPLEMENTED, "runs source and converted model on random inputs and prints the max abs difference per output"),
    PoprtFlag("--checkpoints", VALUE, REFUSED, "intermediate tensors of a packed model could not be split per request; add them as graph outputs before converting"),
    PoprtFlag("--compiler_options", VALUES, NOTICE, "they are options of PopRT's Poplar compiler; onnxruntime compiles nothing ahead"),
    PoprtFlag("--config_yaml", VALUE, IMPLEMENTED, "the flags as a YAML mapping (flag name: value); flags on the command line override it"),
    PoprtFlag("--convert_version", VALUE, NOTICE, "poprt-lite keeps the model's opset (onnxruntime runs ONNX opset 13 and newer; PopRT converts for PopART)"),
    PoprtFlag("--custom_library_so_paths", VALUES, REFUSED, "PopART custom-op libraries do not load into onnxruntime; poprt-lite's custom ops are ONNX functions (--list_all_ops)"),
    PoprtFlag("--custom_pass_config", VALUE, IMPLEMENTED, "imports Python files of passes (PopRT's pass API or poprt-lite's), comma-separated, like --plugin"),
    PoprtFlag("--custom_shape_inference", VALUE, REFUSED, "PopRT shape-inference scripts register with PopRT's C++ shape inference; custom ops for poprt-lite bring an onnx schema"),
    PoprtFlag("--data_preprocess", VALUE, REFUSED, f"is FP8 calibration data: {FP8}"),
    PoprtFlag("--disable_compilation_progress_bar", SWITCH, NOTICE, "there is no compilation progress bar (--quiet prints errors only)"),
    PoprtFlag("--disable_fast_norm", SWITCH, NOTICE, "FastNorm is an IPU op, which poprt-lite never inserts"),
    PoprtFlag("--eightbitsio", SWITCH, REFUSED, "turns image inputs into uint8 for IPU transfers, which changes the model's interface"),
    PoprtFlag("--merge_if_with_same_cond", SWITCH, NOTICE, "it is an IPU control-flow optimisation; onnxruntime runs If nodes as they are"),
    PoprtFlag("--enable_compress_pattern", SWITCH, NOTICE, "MaskCompress is an IPU op, which poprt-lite never inserts"),
    PoprtFlag("--enable_erf_gelu", SWITCH, NOTICE, "it inserts the IPU's Gelu op; onnxruntime fuses Gelu patterns itself"),
    PoprtFlag("--enable_insert_remap", SWITCH, NOTICE, "Remap ops rearrange IPU tensor layouts; onnxruntime has none to rearrange"),
    PoprtFlag("--export_popef", SWITCH, IMPLEMENTED, "writes <output_dir>/executable.popef, poprt-lite's artifact (model + manifest)"),
    PoprtFlag("--fold_periodic_initializer", SWITCH, NOTICE, "it saves IPU always-live memory; a CPU has no such limit"),
    PoprtFlag("--fp16_skip_op_types", VALUE, IMPLEMENTED, "op types kept in float32 with --precision fp16"),
    PoprtFlag("--enable_avoid_overflow_patterns", SWITCH, NOTICE, "poprt-lite's float_to_half clamps float32 constants into float16's range; keep op types in float32 with --fp16_skip_op_types"),
    PoprtFlag("--fp8_skip_op_names", VALUE, REFUSED, FP8),
    PoprtFlag("--fp8_params", VALUE, REFUSED, FP8),
    PoprtFlag("--framework", VALUE, IMPLEMENTED, "onnx (the only one; convert TensorFlow models with the tf2onnx package first)"),
    PoprtFlag("--infer_shape_ahead", SWITCH, NOTICE, "the pass manager infers shapes after every pass anyway (--input_shape pins them)"),
    PoprtFlag("--input_model", VALUE, IMPLEMENTED, "the ONNX model to convert (also -i)"),
    PoprtFlag("--input_shape", VALUES, IMPLEMENTED, "pins input dims; inputs sharing a symbolic dim follow"),
    PoprtFlag("--ipu_version", VALUE, NOTICE, "it selects the IPU generation; poprt-lite runs on onnxruntime's CPU provider"),
    PoprtFlag("--list_all_passes", SWITCH, IMPLEMENTED, "lists the passes with their PopRT names"),
    PoprtFlag("--logging_level", VALUE, IMPLEMENTED, "DEBUG, INFO, WARNING, ERROR or CRITICAL for poprt-lite's log"),
    PoprtFlag("--manual_sharding_config", VALUE, NOTICE, "it shards a model over several IPUs; onnxruntime runs it whole in one process"),
    PoprtFlag("--max_tensor_size", VALUE, IMPLEMENTED, "constant folding leaves results larger than this many bytes computed at run time (whole MiB)"),
    PoprtFlag("--num_io_tiles", VALUE, NOTICE, "it reserves IPU tiles for overlapped I/O; onnxruntime has no tiles"),
    PoprtFlag("--num_of_layers_keep_fp16", VALUE, REFUSED, f"is part of FP8 quantisation: {FP8}"),
    PoprtFlag("--only_manual_sharding", SWITCH, REFUSED, "would only shard the model over several IPUs, which does not apply on onnxruntime, so there is nothing to do"),
    PoprtFlag("--optimize_internal_exchange_code", SWITCH, NOTICE, "it shrinks IPU exchange code; a CPU has none"),
    PoprtFlag("--output_dir", VALUE, IMPLEMENTED, "folder for the converted model, the artifact and dumps"),
    PoprtFlag("--output_model", VALUE, IMPLEMENTED, "name of the converted model, placed in --output_dir when given (as in PopRT)"),
    PoprtFlag("--pack_args", VALUES, IMPLEMENTED, "packing: max_valid_num, segment_max_size, mode, max_tokens (token_stream), dynamic_groups; PopRT's other keys with a notice"),
    PoprtFlag("--passes", VALUE, IMPLEMENTED, "passes added to the default pipeline, PopRT or poprt-lite names (--pipeline gives the whole pipeline)"),
    PoprtFlag("--perf_tuner", SWITCH, NOTICE, "it is not implemented in PopRT either"),
    PoprtFlag("--popart_options", VALUES, NOTICE, "they are PopART session options; the runtime configures onnxruntime's sessions"),
    PoprtFlag("--precision", VALUE, IMPLEMENTED, f"fp32 or fp16; fp8 and fp8_weight are refused: {FP8}"),
    PoprtFlag("--precision_compare", SWITCH, REFUSED, f"compares FP8 layers with the source: {FP8} (--check compares outputs)"),
    PoprtFlag("--print_completion", VALUE, REFUSED, "poprt-lite ships no shell completion script"),
    PoprtFlag("--remap_mode", VALUE, NOTICE, "it places IPU Remap ops (see --enable_insert_remap)"),
    PoprtFlag("--remove_outputs", VALUE, IMPLEMENTED, "removes these outputs and the nodes only they needed (comma-separated)"),
    PoprtFlag("--run", SWITCH, IMPLEMENTED, "runs the converted model on random inputs (as --check, which also compares with the source)"),
    PoprtFlag("--serialize_matmul", VALUES, NOTICE, IPU_TUNING),
    PoprtFlag("--serialize_matmul_add", VALUES, NOTICE, IPU_TUNING),
    PoprtFlag("--merge_matmul", VALUE, NOTICE, IPU_TUNING),
    PoprtFlag("--merge_matmul_add", VALUE, NOTICE, IPU_TUNING),
    PoprtFlag("--merge_moe", VALUE, NOTICE, IPU_TUNING),
    PoprtFlag("--show", SWITCH, IMPLEMENTED, "prints the input model's inputs, outputs and ops (as poprt-lite inspect) and exits"),
    PoprtFlag("--show_io_stat", SWITCH, IMPLEMENTED, "as --show"),
    PoprtFlag("--skip_passes", VALUE, IMPLEMENTED, "passes left out of the default pipeline"),
    PoprtFlag("--version", SWITCH, IMPLEMENTED, "prints the version (PopRT's -v; in poprt-lite -v is --verbose)"),
    PoprtFlag("tf2onnx", VALUES, REFUSED, "convert TensorFlow models to ONNX with the tf2onnx package first"),
)
BY_NAME = {flag.name: flag for flag in FLAGS}
NOT_IMPLEMENTED = tuple(flag for flag in FLAGS if flag.status != IMPLEMENTED and flag.flag.startswith("--"))
MULTI_VALUE = frozenset(flag.flag for flag in FLAGS if flag.takes == VALUES)


def message(flag: PoprtFlag, spelled: Callable[[PoprtFlag], str] = lambda flag: flag.flag) -> str:
    if flag.status == NOTICE:
        return f"{spelled(flag)} does not apply, ignored: {flag.why}"
    return f"{spelled(flag)} is not supported: {flag.why}"


def apply(given: dict[str, Any], spelled: Callable[[PoprtFlag], str] = lambda flag: flag.flag) -> None:
    """Refuse the refused options among `given` (name -> value; None/False/[] = not given), then
    log one notice per ignored one. `spelled` names an option in the messages (CLI flag or keyword)."""
    present = [BY_NAME[name] for name, value in given.items() if value not in (None, False, [], (), {})]
    for flag in present:
        if flag.status == REFUSED:
            raise PoprtError(message(flag, spelled))
    for flag in present:
        log.warning(message(flag, spelled))


