"""Options shared by several commands, each declared once.

`GLOBAL_OPTIONS` (`-v/--verbose`, `--quiet`, `--debug`) are taken by the app itself and by every
subcommand (`@global_options` adds them to a command), before or after the subcommand's name:
`poprt-lite -v inspect M.onnx` and `poprt-lite inspect M.onnx -v` mean the same. Their values are
applied while the command line is parsed, into the `Settings` object `main()` passes as the click
context's `obj`. `PluginOption` is the one `--plugin` declaration, used by `convert` and `passes`;
`PackArgsOption` and `InputShapeOption` the one `--pack_args` and `--input_shape`, used by `convert`,
`embed` and `serve` (and read by `pack_args_of`, `input_shapes_of`, `packing`). `flag` spells a
library option as the CLI's flag, in every message made while a command runs.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from poprt_lite import compiler, passes
from poprt_lite.runtime import modes

LOGGER = "poprt_lite"
log = logging.getLogger(__name__)
# Library options whose flag is spelled otherwise; every other option `name` is the flag `--name`.
FLAG_NAMES = {"pass_options": "pass_option", "load_plugin": "plugin", "ray_address": "ray"}


def flag(name: str) -> str:
    """The flag of library option `name`: how messages spell options under the CLI (errors.option)."""
    return f"--{FLAG_NAMES.get(name, name)}"


@dataclass
class Settings:
    """What the global options say, for the whole invocation."""

    verbose: bool = False
    quiet: bool = False
    debug: bool = False

    def log_level(self) -> int:
        if self.quiet:
            return logging.ERROR
        return logging.INFO if self.verbose else logging.WARNING


_CURRENT: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("poprt_lite_cli_settings", default=None)


def current() -> Settings:
    """The settings of the command being run (defaults outside a command line)."""
    return _CURRENT.get() or Settings()


def _apply(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> bool:
    settings = ctx.find_object(Settings)
    if settings is None:  # invoked without main() (e.g. typer's test runner)
        settings = ctx.ensure_object(Settings)
    if value:  # a subcommand's default never undoes the flag given before it
        setattr(settings, param.name, True)
    _CURRENT.set(settings)  # main() runs each command line in a context of its own
    logging.getLogger(LOGGER).setLevel(settings.log_level())
    return value


@dataclass(frozen=True)
class _GlobalOption:
    name: str
    flags: tuple[str, ...]
    help: str

    def parameter(self) -> inspect.Parameter:
        option = typer.Option(*self.flags, help=self.help, callback=_apply, is_eager=True)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, option])


GLOBAL_OPTIONS = (
    _GlobalOption("verbose", ("-v", "--verbose"), "Log progress details."),
    _GlobalOption("quiet", ("--quiet",), "Print errors and the command's report only (no progress, logs or status lines)."),
    _GlobalOption("debug", ("--debug",), "Show tracebacks."),
)
GLOBAL_FLAGS = frozenset(flag for option in GLOBAL_OPTIONS for flag in option.flags)


def with_options(
    command: Callable[..., Any],
    parameters: Sequence[inspect.Parameter],
    around: Callable[[dict[str, Any], Callable[[], Any]], Any],
) -> Callable[..., Any]:
    """`command` with extra keyword `parameters` that it never sees: `around(values, call)` gets
    their values and runs `call()`, the command with its own arguments."""
    signature = inspect.signature(command, eval_str=True)  # typer would not resolve string annotations behind __signature__
    names = [p.name for p in parameters]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in names}
        return around(values, lambda: command(*args, **kwargs))

    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *parameters])  # type: ignore[attr-defined]
    return wrapper


def global_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` the global options (applied while parsing; the command itself never sees them)."""

    return with_options(command, [option.parameter() for option in GLOBAL_OPTIONS], lambda values, call: call())


PluginOption = Annotated[
    Optional[list[str]],
    typer.Option("--plugin", help="Load a pass plugin first: path/to/file.py or a module name (several after one flag)."),
]


def load_plugins(specs: Sequence[str] | None) -> None:
    """Import each `--plugin`; with -v, log the passes each one registered."""
    for spec in specs or []:
        names = passes.load_plugin(spec)
        log.info("plugin %s registered %s", spec, ", ".join(names) if names else "no pass")


# Options of several commands (--pack_args, --input_shape: convert, embed, serve; the others: the
# commands that take a model as it comes, embed and serve): declared once here.
TokenizerOption = Annotated[
    Optional[Path], typer.Option("--tokenizer", help="tokenizer.json, or its folder (default: beside MODEL).")
]
PackArgsOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--pack_args",
        help="max_valid_num=N segment_max_size=L [mode=M] [max_tokens=T] [dynamic_groups=[[input_ids,]]]; "
        f"M: {', '.join(modes.names()[:-1])} or {modes.names()[-1]} (which takes max_tokens=T, a batch's most tokens, "
        "and no --input_shape). AttentionMask mode derives both numbers from --input_shape. embed and serve pack an "
        "unpacked MODEL with them (default mode=token_stream max_valid_num=64 max_tokens=4096).",
    ),
]
InputShapeOption = Annotated[
    Optional[list[str]],
    typer.Option("--input_shape", help="NAME=D0,D1 ... (several after one flag; embed and serve: for an unpacked MODEL in a static mode)."),
]
PrecisionOption = Annotated[Optional[str], typer.Option("--precision", help="For an unpacked MODEL: fp32, fp16 or int8 (as convert's).")]
OutputNameOption = Annotated[Optional[str], typer.Option("--output_name", help="The pooled output, if the model has several.")]
MaxLengthOption = Annotated[Optional[int], typer.Option("--max_length", help="Truncate sentences at this many tokens.")]
ThreadsOption = Annotated[int, typer.Option("--threads", help="Onnxruntime intra-op threads (0: one per core).")]
RayOption = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        help="Run on Ray: auto (the cluster this machine belongs to), HOST:PORT of a cluster's head, ray://HOST:PORT "
        "(Ray Client), or local (a Ray instance started for the job).",
        show_default=False,
    ),
]


def pack_args_of(items: Sequence[str] | None) -> dict[str, str]:
    """`--pack_args` as the library takes it."""
    return compiler.parse_key_values(items or [], "--pack_args")


def input_shapes_of(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """`--input_shape` as the library takes it."""
    return compiler.parse_input_shapes(items or [])


def packing(pack_args: Sequence[str] | None, input_shape: Sequence[str] | None, precision: str | None = None) -> dict[str, Any]:
    """`--pack_args` / `--input_shape` / `--precision` as `open_artifact` takes them (None where not given)."""
    return dict(
        pack_args=pack_args_of(pack_args) if pack_args else None,
        input_shape=input_shapes_of(input_shape) if input_shape else None,
        precision=precision,
    )
