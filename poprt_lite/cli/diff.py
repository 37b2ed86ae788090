"""`poprt-lite diff A B`: structural model diff; exit code 0 equal, 1 different, 2 error (as `diff`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import onnx
import typer

from poprt_lite.ir.artifact import Artifact, load_model_or_artifact
from poprt_lite.tools.diff import IGNORABLE, diff_models, print_report


def diff_command(
    a: Annotated[Path, typer.Argument(help="The old model: an .onnx file or an artifact.", show_default=False, metavar="A")],
    b: Annotated[Path, typer.Argument(help="The new model: an .onnx file or an artifact.", show_default=False, metavar="B")],
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ignore: Annotated[
        Optional[list[str]],
        typer.Option("--ignore", help=f"Leave out {', '.join(IGNORABLE)} (repeat the flag or separate with commas)."),
    ] = None,
) -> None:
    ignored = [item.strip() for value in ignore or [] for item in value.split(",") if item.strip()]
    result = diff_models(_model(a), _model(b), ignore=ignored, labels=(str(a), str(b)))
    if json:
        print(result.to_json())
    else:
        print_report(result)
    if not result.equal:
        # SystemExit, not typer.Exit: typer returns Exit's code without raising when not standalone.
        raise SystemExit(1)


def _model(path: Path) -> onnx.ModelProto:
    loaded = load_model_or_artifact(path)
    return loaded.model() if isinstance(loaded, Artifact) else loaded
