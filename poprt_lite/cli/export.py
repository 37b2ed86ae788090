"""`poprt-lite export FOLDER -o model.onnx`: a Hugging Face or sentence-transformers model folder to
one ONNX model (the transformer, the folder's pooling and normalization), its tokenizer and config
files beside it (`poprt_lite.apps.export`; needs `pip install 'poprt-lite[export]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from poprt_lite.apps.export import DEFAULT_EXPORTER, EXPORTERS, export_folder
from poprt_lite.cli import options


def export_command(
    folder: Annotated[Path, typer.Argument(help="The model folder (modules.json or config.json, and the weights).", show_default=False, metavar="FOLDER")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The ONNX file to write; tokenizer and config files go beside it.", show_default=False)],
    exporter: Annotated[str, typer.Option("--exporter", help=f"torch.onnx's exporter: {' or '.join(EXPORTERS)}.")] = DEFAULT_EXPORTER,
) -> None:
    written = export_folder(folder, output, exporter=exporter)
    if not options.current().quiet:
        print(f"wrote {written[0]} and beside it {', '.join(p.name for p in written[1:])}")
