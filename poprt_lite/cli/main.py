"""The `poprt-lite` command.

The flat PopRT form (`poprt-lite --input_model m.onnx --input_shape input_ids=16,256 ...`) is the
`convert` subcommand; other subcommands (`passes`, `ops`, `inspect`, ...) sit beside it. Flags that
take several values after one flag, as PopRT's do, are rewritten into click's repeated form before
parsing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import typer
from typer.exceptions import TyperException

from poprt_lite.cli import bench, convert, diff, inspect, listing
from poprt_lite.errors import PoprtError

app = typer.Typer(
    name="poprt-lite",
    help="Compile transformer-encoder ONNX models for padding-free (packed) inference on onnxruntime.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: '[mode=...]' and '.[plot]' must print as written
)
app.command("convert", help="Convert a model (the default: `poprt-lite --input_model ...` means `poprt-lite convert ...`).")(
    convert.convert
)
app.command("passes", help="List the registered passes, built-in and plugins.")(listing.passes_command)
app.command("ops", help="List the custom ops.")(listing.ops_command)
app.command("diff", help="Compare two models or artifacts structurally; exit 0 if equal, 1 if different, 2 on error.")(diff.diff_command)
app.command("inspect", help="Show a model's or artifact's interface, ops, metadata and manifest.")(inspect.inspect_command)
app.command("bench", help="Benchmark packed vs padded throughput, latency and accuracy on the same requests.")(bench.bench_command)

MULTI_VALUE_FLAGS = {"--input_shape", "--pack_args", "--plugin", "--dump_after", "--fp16_skip_op_types", "--pass_option"}


def expand_multi_value_flags(argv: Sequence[str]) -> list[str]:
    """`--input_shape a=1 b=2` -> `--input_shape a=1 --input_shape b=2` (PopRT's spelling)."""
    out: list[str] = []
    flag = None
    for token in argv:
        if token.startswith("-"):
            flag = token if token in MULTI_VALUE_FLAGS else None
            out.append(token)
        elif flag is not None and out[-1] != flag:
            out += [flag, token]
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("--help", "-h"):
        argv.insert(0, "convert")
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logger = logging.getLogger("poprt_lite")
    previous_level = logger.level
    if "--quiet" in argv:
        logger.setLevel(logging.ERROR)
    elif "-v" in argv or "--verbose" in argv:
        logger.setLevel(logging.INFO)
    try:
        return _run(argv, debug)
    finally:
        logger.setLevel(previous_level)


def _run(argv: list[str], debug: bool) -> int:
    try:
        app(expand_multi_value_flags(argv), prog_name="poprt-lite", standalone_mode=False)
    except PoprtError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # click usage errors and anything unexpected: one line, no traceback
        if debug:
            raise
        if isinstance(exc, typer.Exit):
            return exc.exit_code
        if isinstance(exc, typer.Abort):
            return 1
        if isinstance(exc, TyperException):  # usage errors (typer's own click)
            message = exc.format_message()
            if message:  # empty when the usage text was printed instead (no arguments)
                print(f"error: {message}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        print(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback", file=sys.stderr)
        return 2
    return 0
