"""`poprt-lite passes` and `poprt-lite ops`: what is registered (and PopRT's `tf2onnx`, refused)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from poprt_lite import ops, passes
from poprt_lite.cli import options, poprt_flags
from poprt_lite.errors import PoprtError
from poprt_lite.compat.poprt_names import poprt_names_of


def passes_command(plugin: options.PluginOption = None) -> None:
    options.load_plugins(plugin)
    table = Table("pass", "PopRT name", "options", "description", title="passes", title_justify="left")
    for cls in passes.list_passes():
        table.add_row(cls.name, ", ".join(poprt_names_of(cls.name)), ", ".join(cls.option_names()), cls.description)
    Console(highlight=False, width=200).print(table)


def ops_command() -> None:
    table = Table("op", "domain", "version", "description", title="custom ops", title_justify="left")
    for op in ops.list_ops():
        table.add_row(op.name, op.domain, str(op.version), op.doc)
    Console(highlight=False, width=200).print(table)


def tf2onnx_command(args: Annotated[Optional[list[str]], typer.Argument(help="PopRT's tf2onnx arguments.")] = None) -> None:
    raise PoprtError(poprt_flags.message(poprt_flags.BY_NAME["tf2onnx"]))
