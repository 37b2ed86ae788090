"""`poprt-lite embed MODEL --input lines.txt --output vectors.npy`: one embedding per line.

MODEL is an artifact, a packed .onnx, or an exported sentence-embedding ONNX model (packed in memory
with --pack_args, by default mode=token_stream max_valid_num=64 max_tokens=4096; a static mode takes
--input_shape too); the tokenizer.json is the one beside MODEL unless --tokenizer names it
(`poprt_lite.embed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from poprt_lite.apps.embed import Embedder
from poprt_lite.cli import options


def embed_command(
    model: Annotated[Path, typer.Argument(help="An artifact, a packed .onnx or an exported ONNX model.", show_default=False, metavar="MODEL")],
    input: Annotated[Path, typer.Option("--input", help="Text file: one sentence per line (UTF-8).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", help="Where to write the float32 [lines, dim] array (.npy).", show_default=False)],
    tokenizer: options.TokenizerOption = None,
    output_name: options.OutputNameOption = None,
    max_length: options.MaxLengthOption = None,
    pack_args: options.PackArgsOption = None,
    input_shape: options.InputShapeOption = None,
    progress: Annotated[bool, typer.Option("--progress", help="Show a progress bar on stderr.")] = False,
) -> None:
    embedder = Embedder.open(model, tokenizer, output=output_name, max_length=max_length, **options.packing(pack_args, input_shape))
    count = embedder.embed_file(input, output, progress=progress)
    print(f"{count} lines -> {output} ({count} x {' x '.join(map(str, embedder.dimension))} float32, output '{embedder.output}')")
