"""`poprt-lite convert` (the flat PopRT form): flags -> `poprt_lite.compile`."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from poprt_lite import compiler, ir, passes, verify
from poprt_lite.cli import listing, options
from poprt_lite.errors import PoprtError

Multi = Optional[list[str]]
log = logging.getLogger(__name__)


def convert(
    input_model: Annotated[Optional[Path], typer.Option("--input_model", help="The ONNX model to convert.")] = None,
    output_model: Annotated[
        Optional[Path], typer.Option("--output_model", help="Where to write the converted model (default: <input>.poprt-lite.onnx).")
    ] = None,
    output_dir: Annotated[
        Optional[Path], typer.Option("--output_dir", help="Folder for the artifact, dumps and the default output model.")
    ] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 or fp16.")] = "fp32",
    input_shape: Annotated[Multi, typer.Option("--input_shape", help="NAME=D0,D1 ... (several after one flag).")] = None,
    pack_args: Annotated[
        Multi, typer.Option("--pack_args", help="max_valid_num=N segment_max_size=L [mode=unpack_repack|attention_mask].")
    ] = None,
    export_position_ids: Annotated[
        bool, typer.Option("--export_position_ids", help="Make position_ids a model input (implied by --pack_args).")
    ] = False,
    passes_: Annotated[Optional[str], typer.Option("--passes", help="Explicit pipeline: a,b,c (see --list_all_passes).")] = None,
    pass_option: Annotated[Multi, typer.Option("--pass_option", help="PASS.KEY=VALUE options for passes.")] = None,
    list_all_passes: Annotated[bool, typer.Option("--list_all_passes", help="List every registered pass and exit.")] = False,
    list_all_ops: Annotated[bool, typer.Option("--list_all_ops", help="List the custom ops and exit.")] = False,
    plugin: options.PluginOption = None,
    dump_after: Annotated[Multi, typer.Option("--dump_after", help="Write the model after these passes (or 'all') to --output_dir.")] = None,
    export_popef: Annotated[bool, typer.Option("--export_popef", help="Also write the artifact <output_dir>/executable.popef.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Compare source and converted model on random inputs.")] = False,
    fp16_io: Annotated[bool, typer.Option("--fp16_io", help="With fp16: make float inputs/outputs float16 too.")] = False,
    fp16_skip_op_types: Annotated[Multi, typer.Option("--fp16_skip_op_types", help="With fp16: op types kept in float32.")] = None,
) -> None:
    options.load_plugins(plugin)
    if list_all_passes or list_all_ops:
        if list_all_passes:
            listing.passes_command()
        if list_all_ops:
            listing.ops_command()
        return
    if input_model is None:
        raise PoprtError("--input_model is required (or --list_all_passes / --list_all_ops)")
    if export_popef and output_dir is None:
        raise PoprtError("--export_popef writes <output_dir>/executable.popef; give --output_dir")
    compile_options = compiler.CompileOptions(
        precision=precision,
        input_shape=compiler.parse_input_shapes(input_shape or []),
        pack_args=compiler.parse_key_values(pack_args or [], "--pack_args"),
        export_position_ids=export_position_ids,
        passes=[p.strip() for p in passes_.split(",") if p.strip()] if passes_ else None,
        pass_options=_pass_options(pass_option or []),
        fp16_io=fp16_io,
        fp16_skip_op_types=[t for item in fp16_skip_op_types or [] for t in item.split(",") if t],
        dump_after=dump_after or [],
    )
    for configured in compiler.build_pipeline(compile_options):
        log.info("pass %s: %s", configured.name, _options_text(configured))
    quiet = options.current().quiet
    console = Console(quiet=quiet, highlight=False)
    table = Table("pass", "changed", "time (ms)", "details", title="pipeline", title_justify="left")
    with console.status("converting...") if not quiet and console.is_terminal else contextlib.nullcontext():
        result = compiler.compile(
            input_model,
            output_model,
            output_dir=output_dir,
            export_popef=export_popef,
            options=compile_options,
        )
    for record in result.records:
        table.add_row(record.name, "yes" if record.changed else "no", f"{record.seconds * 1000:.1f}", record.message)
    console.print(table)
    console.print(f"wrote {result.output_model}")
    if result.artifact is not None:
        console.print(f"wrote {result.artifact}")
    if check:
        diffs = verify.max_abs_diff(ir.load_model(input_model), result.model)
        for name, diff in diffs.items():
            console.print(f"check: {name} max abs diff {diff:.3g}")


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
