"""The `poprt-lite` command.

The flat PopRT form (`poprt-lite --input_model m.onnx --input_shape input_ids=16,256 ...`) is the
`convert` subcommand; other subcommands (`passes`, `ops`, `inspect`, ...) sit beside it. The global
options (cli/options.py) are taken before or after a subcommand's name. Flags that take several
values after one flag, as PopRT's do, are rewritten into click's repeated form before parsing.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Sequence

import typer
from typer.exceptions import TyperException

from poprt_lite.cli import bench, convert, diff, embed, export, inspect, listing, options, poprt_flags, serve
from poprt_lite.errors import PoprtError, spell_options

app = typer.Typer(
    name="poprt-lite",
    help="Compile transformer-encoder ONNX models for padding-free (packed) inference on onnxruntime.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: '[mode=...]' and '.[plot]' must print as written
)
COMMANDS = {
    "convert": (convert.convert, "Convert a model (the default: `poprt-lite --input_model ...` means `poprt-lite convert ...`)."),
    "passes": (listing.passes_command, "List the registered passes, built-in and plugins."),
    "ops": (listing.ops_command, "List the custom ops."),
    "diff": (diff.diff_command, "Compare two models or artifacts structurally; exit 0 if equal, 1 if different, 2 on error."),
    "inspect": (inspect.inspect_command, "Show a model's or artifact's interface, ops, metadata and manifest."),
    "bench": (bench.bench_command, "Benchmark packed vs padded throughput, latency and accuracy on the same requests."),
    "embed": (embed.embed_command, "Embed the lines of a text file with a sentence-embedding model; write one vector per line (.npy)."),
    "serve": (serve.serve_command, "Serve a model over HTTP: OpenAI embeddings, text-embeddings-inference routes, KServe v2 (Triton) inference."),
    "export": (export.export_command, "Export a Hugging Face or sentence-transformers model folder to one ONNX model (needs '.[export]')."),
    "tf2onnx": (listing.tf2onnx_command, "PopRT's TensorFlow converter: not supported (use the tf2onnx package)."),
}
TAKES_ANYTHING = {"tf2onnx"}  # refused whatever its arguments, so they are not parsed
for _name, (_command, _help) in COMMANDS.items():
    _settings = {"ignore_unknown_options": True, "allow_extra_args": True} if _name in TAKES_ANYTHING else None
    app.command(_name, help=_help, context_settings=_settings)(options.global_options(_command))


@app.callback()
@options.global_options
def _app() -> None:
    """Global options go before or after the subcommand's name."""


MULTI_VALUE_FLAGS = {
    "--input_shape", "--pack_args", "--plugin", "--dump_after", "--fp16_skip_op_types", "--pass_option", "--passes",
    "--skip_passes", "--pipeline", "--remove_outputs", "--checkpoints", "--custom_pass_config", *poprt_flags.MULTI_VALUE,
}


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
    first = next((token for token in argv if token not in options.GLOBAL_FLAGS), None)
    if first is not None and first.startswith("-") and first not in ("--help", "-h"):
        argv.insert(0, "convert")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logger = logging.getLogger(options.LOGGER)
    previous_level = logger.level
    settings = options.Settings()
    try:
        return contextvars.copy_context().run(_run, argv, settings)  # the settings of this command line only
    finally:
        logger.setLevel(previous_level)


def _run(argv: list[str], settings: options.Settings) -> int:
    try:
        with spell_options(options.flag):  # errors and log lines name options by their flags
            app(expand_multi_value_flags(argv), prog_name="poprt-lite", standalone_mode=False, obj=settings)
    except PoprtError as exc:
        if settings.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # click usage errors and anything unexpected: one line, no traceback
        if settings.debug:
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
