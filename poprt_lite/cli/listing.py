"""`poprt-lite passes` and `poprt-lite ops`: what is registered."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from poprt_lite import ops, passes


def passes_command(
    plugin: Annotated[Optional[list[str]], typer.Option("--plugin", help="Load a pass plugin first.")] = None,
) -> None:
    for spec in plugin or []:
        passes.load_plugin(spec)
    table = Table("pass", "options", "description", title="passes", title_justify="left")
    for cls in passes.list_passes():
        table.add_row(cls.name, ", ".join(cls.option_names()), cls.description)
    Console(highlight=False, width=200).print(table)


def ops_command() -> None:
    table = Table("op", "domain", "version", "description", title="custom ops", title_justify="left")
    for op in ops.list_ops():
        table.add_row(op.name, op.domain, str(op.version), op.doc)
    Console(highlight=False, width=200).print(table)
