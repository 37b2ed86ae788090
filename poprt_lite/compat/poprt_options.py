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


FP8 = "FP8 is an IPU number format and onnxruntime's CPU provider has no FP8 MatMul; use --precision int8, fp16 or fp32"
IPU_TUNING = "it tunes named MatMuls for IPU memory and cycles; onnxruntime picks its own kernels"

# One row per flag: flag | what it takes | status | how poprt-lite does it, or why not.
TABLE = """
--apply_hcsr                       | values | refused     | merges inputs into one host-concatenated input for IPU transfers, which changes the model's interface; poprt-lite keeps the inputs as they are
--available_memory_proportion      | value  | notice      | it sets the IPU on-chip memory for MatMul/Conv/Gemm; a CPU has no such budget
--batch_size                       | value  | refused     | give each input's whole shape with --input_shape NAME=B,S (poprt-lite pins shapes per input)
--batch_axis                       | value  | refused     | give each input's whole shape with --input_shape NAME=B,S (poprt-lite pins shapes per input)
--batches_per_step                 | value  | notice      | it is the IPU's device loop; one onnxruntime run is one batch
--calibration_with_data            | switch | refused     | calibrates FP8: {FP8}
--calibration_loss_type            | value  | refused     | calibrates FP8: {FP8}
--check                            | switch | implemented | runs source and converted model on random inputs and prints the max abs difference per output; exits 1 above --check_atol (poprt-lite's tolerance)
--checkpoints                      | value  | implemented | adds these intermediate tensors to the outputs, comma-separated (refused with packing: they could not be split per request)
--compiler_options                 | values | notice      | they are options of PopRT's Poplar compiler; onnxruntime compiles nothing ahead
--config_yaml                      | value  | implemented | the flags as a YAML mapping (flag name: value); flags on the command line override it
--convert_version                  | value  | notice      | poprt-lite keeps the model's opset (onnxruntime runs ONNX opset 13 and newer; PopRT converts for PopART)
--custom_library_so_paths          | values | refused     | PopART custom-op libraries do not load into onnxruntime; poprt-lite's custom ops are ONNX functions (--list_all_ops)
--custom_pass_config               | value  | implemented | imports Python files of passes (PopRT's pass API or poprt-lite's), comma-separated, like --plugin
--custom_shape_inference           | value  | refused     | PopRT shape-inference scripts register with PopRT's C++ shape inference; custom ops for poprt-lite bring an onnx schema
--data_preprocess                  | value  | refused     | is FP8 calibration data: {FP8}
--disable_compilation_progress_bar | switch | notice      | there is no compilation progress bar (--quiet prints errors only)
--disable_fast_norm                | switch | notice      | FastNorm is an IPU op, which poprt-lite never inserts
--eightbitsio                      | switch | refused     | turns image inputs into uint8 for IPU transfers, which changes the model's interface
--merge_if_with_same_cond          | switch | notice      | it is an IPU control-flow optimisation; onnxruntime runs If nodes as they are
--enable_compress_pattern          | switch | notice      | MaskCompress is an IPU op, which poprt-lite never inserts
--enable_erf_gelu                  | switch | notice      | it inserts the IPU's Gelu op; onnxruntime fuses Gelu patterns itself
--enable_insert_remap              | switch | notice      | Remap ops rearrange IPU tensor layouts; onnxruntime has none to rearrange
--export_popef                     | switch | implemented | writes <output_dir>/executable.popef, poprt-lite's artifact (model + manifest)
--fold_periodic_initializer        | switch | notice      | it saves IPU always-live memory; a CPU has no such limit
--fp16_skip_op_types               | value  | implemented | op types kept in float32 with --precision fp16
--enable_avoid_overflow_patterns   | switch | notice      | poprt-lite's float_to_half clamps float32 constants into float16's range; keep op types in float32 with --fp16_skip_op_types
--fp8_skip_op_names                | value  | refused     | {FP8}
--fp8_params                       | value  | refused     | {FP8}
--framework                        | value  | implemented | onnx (the only one; convert TensorFlow models with the tf2onnx package first)
--infer_shape_ahead                | switch | notice      | the pass manager infers shapes after every pass anyway (--input_shape pins them)
--input_model                      | value  | implemented | the ONNX model to convert (also -i)
--input_shape                      | values | implemented | pins input dims; inputs sharing a symbolic dim follow
--ipu_version                      | value  | notice      | it selects the IPU generation; poprt-lite runs on onnxruntime's CPU provider
--list_all_passes                  | switch | implemented | lists the passes with their PopRT names
--logging_level                    | value  | implemented | DEBUG, INFO, WARNING, ERROR or CRITICAL for poprt-lite's log
--manual_sharding_config           | value  | notice      | it shards a model over several IPUs; onnxruntime runs it whole in one process
--max_tensor_size                  | value  | implemented | constant folding leaves results larger than this many bytes computed at run time (whole MiB)
--num_io_tiles                     | value  | notice      | it reserves IPU tiles for overlapped I/O; onnxruntime has no tiles
--num_of_layers_keep_fp16          | value  | refused     | is part of FP8 quantisation: {FP8}
--only_manual_sharding             | switch | refused     | would only shard the model over several IPUs, which does not apply on onnxruntime, so there is nothing to do
--optimize_internal_exchange_code  | switch | notice      | it shrinks IPU exchange code; a CPU has none
--output_dir                       | value  | implemented | folder for the converted model, the artifact and dumps
--output_model                     | value  | implemented | name of the converted model, placed in --output_dir when given (as in PopRT)
--pack_args                        | values | implemented | packing: max_valid_num, segment_max_size, mode, max_tokens (token_stream), dynamic_groups; PopRT's other keys with a notice
--passes                           | value  | implemented | passes added to the default pipeline, PopRT or poprt-lite names (--pipeline gives the whole pipeline)
--perf_tuner                       | switch | notice      | it is not implemented in PopRT either
--popart_options                   | values | notice      | they are PopART session options; the runtime configures onnxruntime's sessions
--precision                        | value  | implemented | fp32, fp16 or int8 (the CPU's 8-bit: weights per channel, activations per token); fp8 and fp8_weight are refused: {FP8}
--precision_compare                | switch | refused     | compares FP8 layers with the source: {FP8} (--check compares outputs)
--print_completion                 | value  | refused     | poprt-lite ships no shell completion script
--remap_mode                       | value  | notice      | it places IPU Remap ops (see --enable_insert_remap)
--remove_outputs                   | value  | implemented | removes these outputs and the nodes only they needed (comma-separated)
--run                              | switch | implemented | runs the converted model on random inputs (as --check, which also compares with the source)
--serialize_matmul                 | values | notice      | {IPU_TUNING}
--serialize_matmul_add             | values | notice      | {IPU_TUNING}
--merge_matmul                     | value  | notice      | {IPU_TUNING}
--merge_matmul_add                 | value  | notice      | {IPU_TUNING}
--merge_moe                        | value  | notice      | {IPU_TUNING}
--show                             | switch | implemented | prints the input model's inputs, outputs and ops (as poprt-lite inspect) and exits
--show_io_stat                     | switch | implemented | as --show
--skip_passes                      | value  | implemented | passes left out of the default pipeline
--version                          | switch | implemented | prints the version (PopRT's -v; in poprt-lite -v is --verbose)
tf2onnx                            | values | refused     | convert TensorFlow models to ONNX with the tf2onnx package first
"""
FLAGS = tuple(
    PoprtFlag(flag, takes, status, why.format(FP8=FP8, IPU_TUNING=IPU_TUNING))
    for flag, takes, status, why in (map(str.strip, line.split("|", 3)) for line in TABLE.strip().splitlines())
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


