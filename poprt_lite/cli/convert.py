"""`poprt-lite convert` (the flat PopRT form): PopRT's flags -> `poprt_lite.compile`.

Every flag of PopRT 1.5 is taken: the ones poprt-lite implements are declared here, the others
(IPU-only or unsupported) by `poprt_flags.poprt_only`, with a notice or a one-line refusal.
`--config_yaml` supplies flags from a YAML file (config_yaml.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from poprt_lite import __version__, compiler, passes
from poprt_lite.compiler import verify
from poprt_lite.cli import config_yaml as yaml_config
from poprt_lite.cli import listing, options, poprt_flags
from poprt_lite.errors import PoprtError
from poprt_lite.tools.inspect import inspect_path, print_inspection

Multi = Optional[list[str]]
log = logging.getLogger(__name__)
LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@poprt_flags.poprt_only
def convert(
    ctx: typer.Context,
    input_model: Annotated[Optional[Path], typer.Option("-i", "--input_model", help="The ONNX model to convert.")] = None,
    output_model: Annotated[
        Optional[Path],
        typer.Option("--output_model", help="The converted model's file, in --output_dir when given (default: <input name>.poprt-lite.onnx)."),
    ] = None,
    output_dir: Annotated[
        Optional[Path], typer.Option("--output_dir", help="Folder for the converted model, the artifact and dumps.")
    ] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or int8 (weights per channel, activations per token).")] = "fp32",
    input_shape: options.InputShapeOption = None,
    pack_args: options.PackArgsOption = None,
    export_position_ids: Annotated[
        bool, typer.Option("--export_position_ids", help="Make position_ids a model input (implied by packing).")
    ] = False,
    passes_: Annotated[
        Multi,
        typer.Option("--passes", help="Passes added to the default pipeline, PopRT or poprt-lite names: a,b (e.g. insert_attention_mask)."),
    ] = None,
    skip_passes: Annotated[Multi, typer.Option("--skip_passes", help="Passes left out of the default pipeline: a,b.")] = None,
    pipeline: Annotated[
        Multi, typer.Option("--pipeline", help="Exactly these passes, in this order, instead of the default pipeline: a,b,c.")
    ] = None,
    pass_option: Annotated[Multi, typer.Option("--pass_option", help="PASS.KEY=VALUE options for passes.")] = None,
    list_all_passes: Annotated[bool, typer.Option("--list_all_passes", help="List every registered pass and exit.")] = False,
    list_all_ops: Annotated[bool, typer.Option("--list_all_ops", help="List the custom ops and exit.")] = False,
    plugin: options.PluginOption = None,
    custom_pass_config: Annotated[
        Multi, typer.Option("--custom_pass_config", help="Python files of passes, PopRT's pass API or poprt-lite's: a.py,b.py.")
    ] = None,
    dump_after: Annotated[Multi, typer.Option("--dump_after", help="Write the model after these passes (or 'all') to --output_dir.")] = None,
    export_popef: Annotated[bool, typer.Option("--export_popef", help="Also write the artifact <output_dir>/executable.popef.")] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Compare source and converted model on random inputs; above --check_atol exit 1 and write nothing."),
    ] = False,
    check_atol: Annotated[
        Optional[float],
        typer.Option("--check_atol", help=f"--check's largest accepted max abs diff (implies --check; default {verify.DEFAULT_ATOL['fp32']:g} fp32, {verify.DEFAULT_ATOL['fp16']:g} fp16, {verify.DEFAULT_ATOL['int8']:g} int8)."),
    ] = None,
    run: Annotated[bool, typer.Option("--run", help="Run the converted model on random inputs (as --check).")] = False,
    fp16_io: Annotated[bool, typer.Option("--fp16_io", help="With fp16: make float inputs/outputs float16 too.")] = False,
    fp16_skip_op_types: Annotated[Multi, typer.Option("--fp16_skip_op_types", help="With fp16: op types kept in float32.")] = None,
    remove_outputs: Annotated[Multi, typer.Option("--remove_outputs", help="Remove these outputs and what only they need: a,b.")] = None,
    checkpoints: Annotated[Multi, typer.Option("--checkpoints", help="Add these intermediate tensors to the outputs: a,b (not with packing).")] = None,
    max_tensor_size: Annotated[
        int, typer.Option("--max_tensor_size", help="Constant folding leaves results over this many bytes computed (-1: 64 MiB).")
    ] = -1,
    dynamic_rows: Annotated[
        bool,
        typer.Option(
            "--dynamic_rows",
            help="Keep the first (row) dim of --input_shape dynamic, up to its value, so runners on onnxruntime run only the rows a batch uses.",
        ),
    ] = False,
    framework: Annotated[str, typer.Option("--framework", help="The input model's format: onnx.")] = "onnx",
    logging_level: Annotated[
        Optional[str], typer.Option("--logging_level", help=f"poprt-lite's log level: {', '.join(LOGGING_LEVELS)}.")
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="Show the input model's inputs, outputs and ops, and exit.")] = False,
    show_io_stat: Annotated[bool, typer.Option("--show_io_stat", help="As --show.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    config_yaml: Annotated[
        Optional[Path], typer.Option("--config_yaml", help="Flags as a YAML mapping (flag: value); command-line flags override it.")
    ] = None,
) -> None:
    args = {name: value for name, value in locals().items() if name != "ctx"}
    if config_yaml is not None:
        args = yaml_config.merge(ctx, args, config_yaml)
    _convert(SimpleNamespace(**args))


def _convert(flags: SimpleNamespace) -> None:
    """The command's steps; `flags`: every flag by its parameter name, --config_yaml's merged in."""
    _set_logging_level(flags.logging_level)
    if _answered_without_converting(flags):
        return
    compile_options = _compile_options(flags)
    result = _compile(flags, compile_options)
    if flags.check or flags.run or flags.check_atol is not None:
        _check_or_remove(flags.input_model, result.compiled, compile_options, flags.check_atol, result.fresh_dir)
    _report(result.compiled, result.console)


def _set_logging_level(level: str | None) -> None:
    if level is not None:
        if level.upper() not in LOGGING_LEVELS:
            raise PoprtError(f"--logging_level must be one of {', '.join(LOGGING_LEVELS)}, got '{level}'")
        logging.getLogger(options.LOGGER).setLevel(level.upper())


def _answered_without_converting(flags: SimpleNamespace) -> bool:
    """--version, the listings and --show answer without converting; PopRT's flags poprt-lite cannot
    honour, and a missing --input_model, stop the command. Plugins load first (a listing shows them)."""
    if flags.version:
        print(f"poprt-lite {__version__}")
        return True
    if flags.framework != "onnx":
        raise PoprtError(f"--framework {flags.framework} is not supported: poprt-lite reads ONNX models; convert yours with tf2onnx or torch.onnx first")
    if flags.precision in ("fp8", "fp8_weight"):
        raise PoprtError(f"--precision {flags.precision} is not supported: {poprt_flags.FP8}")
    options.load_plugins(flags.plugin)
    options.load_plugins(_names(flags.custom_pass_config))
    if flags.list_all_passes or flags.list_all_ops:
        if flags.list_all_passes:
            listing.passes_command()
        if flags.list_all_ops:
            listing.ops_command()
        return True
    if flags.input_model is None:
        raise PoprtError("--input_model is required (or --list_all_passes / --list_all_ops)")
    if flags.show or flags.show_io_stat:
        print_inspection(inspect_path(flags.input_model))
        return True
    if flags.export_popef and flags.output_dir is None:
        raise PoprtError("--export_popef writes <output_dir>/executable.popef; give --output_dir")
    return False


def _compile_options(flags: SimpleNamespace) -> compiler.CompileOptions:
    compile_options = compiler.CompileOptions(
        precision=flags.precision,
        input_shape=options.input_shapes_of(flags.input_shape),
        pack_args=options.pack_args_of(flags.pack_args),
        export_position_ids=flags.export_position_ids,
        passes=_names(flags.passes_),
        skip_passes=_names(flags.skip_passes),
        pipeline=_names(flags.pipeline) if flags.pipeline else None,
        pass_options=_pass_options(flags.pass_option or []),
        fp16_io=flags.fp16_io,
        fp16_skip_op_types=_names(flags.fp16_skip_op_types),
        dump_after=flags.dump_after or [],
        remove_outputs=_names(flags.remove_outputs),
        checkpoints=_names(flags.checkpoints),
        max_tensor_size=flags.max_tensor_size,
        dynamic_rows=flags.dynamic_rows,
    )
    for configured in compiler.build_pipeline(compile_options):
        log.info("pass %s: %s", configured.name, _options_text(configured))
    return compile_options


@dataclass
class _Converted:
    compiled: compiler.CompileResult
    console: Console
    fresh_dir: Path | None  # --output_dir, if this run made it (removed again when --check fails)


def _compile(flags: SimpleNamespace, compile_options: compiler.CompileOptions) -> _Converted:
    output_model, output_dir = flags.output_model, flags.output_dir
    if output_model is not None and output_dir is not None:
        output_model = output_dir / output_model  # PopRT: the name is placed in --output_dir (an absolute path stays)
    quiet = options.current().quiet
    console = Console(quiet=quiet, highlight=False)
    fresh_dir = output_dir if output_dir is not None and not output_dir.exists() else None
    with console.status("converting...") if not quiet and console.is_terminal else contextlib.nullcontext():
        result = compiler.compile(
            flags.input_model,
            output_model,
            output_dir=output_dir,
            export_popef=flags.export_popef,
            options=compile_options,
        )
    return _Converted(result, console, fresh_dir)


def _report(result: compiler.CompileResult, console: Console) -> None:
    table = Table("pass", "changed", "time (ms)", "details", title="pipeline", title_justify="left")
    for record in result.records:
        table.add_row(record.name, "yes" if record.changed else "no", f"{record.seconds * 1000:.1f}", record.message)
    console.print(table)
    console.print(f"wrote {result.output_model}")
    if result.artifact is not None:
        console.print(f"wrote {result.artifact}")


def _check_or_remove(
    input_model: Path, result: compiler.CompileResult, compile_options: compiler.CompileOptions, atol: float | None, fresh_dir: Path | None
) -> None:
    """--check as a gate: the figures are the command's report (printed even with --quiet); above the
    tolerance, with an output one model lacks (other than --remove_outputs / --checkpoints), or if the
    check cannot run, what the conversion wrote is removed (exit 1, or 2)."""
    try:
        report = verify.check(
            input_model, result.output_model, atol, packed=result.artifact,
            removed=compile_options.remove_outputs, added=compile_options.checkpoints,
        )
    except PoprtError:
        _remove_written(result, fresh_dir)
        raise
    print("\n".join(report.lines()))
    if not report.passed:
        _remove_written(result, fresh_dir)
        print(f"error: check failed: {report.failure}; nothing written", file=sys.stderr)
        raise SystemExit(1)  # 1: the check failed (2 is for errors); typer.Exit would not set the code here


def _remove_written(result: compiler.CompileResult, fresh_dir: Path | None) -> None:
    """Remove the converted model (and its .data), the artifact, and --output_dir if this run made it."""
    model = result.output_model
    for path in (model, model.with_name(f"{model.name}.data") if model else None, result.artifact):
        if path is not None:
            Path(path).unlink(missing_ok=True)
    if fresh_dir is not None and fresh_dir.is_dir() and not any(fresh_dir.iterdir()):
        fresh_dir.rmdir()


def _names(items: list[str] | None) -> list[str]:
    """`["a,b", "c"]` -> `["a", "b", "c"]`: names given comma-separated, several values, or both."""
    return [name.strip() for item in items or [] for name in item.split(",") if name.strip()]


def _options_text(configured: passes.Pass) -> str:
    return ", ".join(f"{key}={value}" for key, value in vars(configured.options).items()) or "no options"


def _pass_options(items: list[str]) -> dict[str, dict[str, str]]:
    grouped: dict[str, dict[str, str]] = {}
    for key, value in compiler.parse_key_values(items, "--pass_option").items():
        pass_name, dot, option = key.partition(".")
        if not dot:
            raise PoprtError(f"bad --pass_option '{key}={value}': expected PASS.KEY=VALUE")
        grouped.setdefault(pass_name, {})[option] = value
    return grouped
