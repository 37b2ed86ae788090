"""`poprt-lite embed MODEL --input lines.txt --output vectors.npy`: one embedding per line.

MODEL is an artifact, a packed .onnx, or an exported sentence-embedding ONNX model (packed in memory
with --pack_args, token_stream by default); the tokenizer.json is the one beside MODEL unless
--tokenizer names it (`poprt_lite.apps.embed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from poprt_lite import compiler
from poprt_lite.apps.embed import Embedder


def embed_command(
    model: Annotated[Path, typer.Argument(help="An artifact, a packed .onnx or an exported ONNX model.", show_default=False, metavar="MODEL")],
    input: Annotated[Path, typer.Option("--input", help="Text file: one sentence per line (UTF-8).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", help="Where to write the float32 [lines, dim] array (.npy).", show_default=False)],
    tokenizer: Annotated[
        Optional[Path], typer.Option("--tokenizer", help="tokenizer.json, or its folder (default: beside MODEL).")
    ] = None,
    output_name: Annotated[Optional[str], typer.Option("--output_name", help="The pooled output, if the model has several.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max_length", help="Truncate sentences at this many tokens.")] = None,
    pack_args: Annotated[
        Optional[list[str]],
        typer.Option("--pack_args", help="For an unpacked MODEL: KEY=VALUE ... as convert's (default mode=token_stream max_valid_num=64 max_tokens=4096)."),
    ] = None,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input_shape", help="For an unpacked MODEL in a static mode: NAME=D0,D1 ...")] = None,
    progress: Annotated[bool, typer.Option("--progress", help="Show a progress bar on stderr.")] = False,
) -> None:
    options = {"output": output_name, "max_length": max_length}
    if pack_args:
        options["pack_args"] = compiler.parse_key_values(pack_args, "--pack_args")
    if input_shape:
        options["input_shape"] = compiler.parse_input_shapes(input_shape)
    embedder = Embedder.open(model, tokenizer, **options)
    count = embedder.embed_file(input, output, progress=progress)
    print(f"{count} lines -> {output} ({count} x {' x '.join(map(str, embedder.dimension))} float32, output '{embedder.output}')")
