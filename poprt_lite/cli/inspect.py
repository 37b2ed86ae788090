"""`poprt-lite inspect MODEL|ARTIFACT`: interface, op histogram, custom ops, metadata, manifest."""

from __future__ import annotations

import json as json_module
from pathlib import Path
from typing import Annotated

import typer

from poprt_lite.tools.inspect import inspect_path, print_inspection


def inspect_command(
    path: Annotated[Path, typer.Argument(help="An .onnx file or an artifact (executable.popef).", show_default=False, metavar="MODEL")],
    json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    report = inspect_path(path)
    if json:
        print(json_module.dumps(report, indent=2))
    else:
        print_inspection(report)
