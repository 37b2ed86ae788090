"""`poprt-lite embed MODEL --input CORPUS --output OUT`: one embedding per sentence.

MODEL is an artifact, a packed .onnx, an exported sentence-embedding ONNX model (packed in memory
with --pack_args, by default mode=token_stream max_valid_num=64 max_tokens=4096; a static mode takes
--input_shape too), or a Hugging Face / sentence-transformers model folder (exported into the cache
on first use, then packed the same way); the tokenizer.json is the one beside MODEL (a folder's own)
unless --tokenizer names it (`poprt_lite.apps.embed`).

`--output V.npy`: the lines of a text file, one float32 array (`Embedder.embed_file`). Any other
`--output` is a folder of Parquet parts (`poprt_lite.apps.corpus`): the `--input` is Parquet, JSON
Lines or text lines, the rows' text in `--column`, each output row the input row's `--id_column`
(if any) and its `embedding`, in the input's order. The job runs in this process, or on a Ray cluster
with `--ray auto|ADDRESS|local` (`poprt_lite.apps.ray`, `pip install 'poprt-lite[ray]'`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from poprt_lite.apps.corpus import OUTPUT_COLUMN, Corpus, ParquetParts, check_output, embed_in_process, read_corpus
from poprt_lite.apps.embed import Embedder
from poprt_lite.cli import options
from poprt_lite.errors import PoprtError
from poprt_lite.runtime.offline import progress_bar
from poprt_lite.runtime.session import check_threads


def embed_command(
    model: Annotated[
        Path,
        typer.Argument(help="An artifact, a packed .onnx, an exported ONNX model or a model folder.", show_default=False, metavar="MODEL"),
    ],
    input: Annotated[Path, typer.Option("--input", help="The sentences: a Parquet (.parquet), JSON Lines (.jsonl) or text (.txt, one per line, UTF-8) file.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", help="A folder for the Parquet parts, or V.npy for one float32 [lines, dim] array of a text file's lines.", show_default=False)],
    tokenizer: options.TokenizerOption = None,
    output_name: options.OutputNameOption = None,
    max_length: options.MaxLengthOption = None,
    pack_args: options.PackArgsOption = None,
    input_shape: options.InputShapeOption = None,
    precision: options.PrecisionOption = None,
    progress: Annotated[bool, typer.Option("--progress", help="Show progress on stderr (on Ray: Ray Data's progress bars).")] = False,
    column: Annotated[str, typer.Option("--column", help="Parquet / JSON Lines: the column holding the text.")] = "text",
    id_column: Annotated[Optional[str], typer.Option("--id_column", help="Parquet / JSON Lines: a column copied to each output row beside its embedding.")] = None,
    ray: options.RayOption = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="With --ray: embedding actors (default: as many as the cluster's CPUs hold).", show_default=False)] = None,
    threads_per_worker: Annotated[Optional[int], typer.Option("--threads_per_worker", help="With --ray: onnxruntime threads (and CPUs) per actor (default 1).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch_size", help="With --ray: sentences per actor call on average, in blocks of equal work (default 1024).", show_default=False)] = None,
    threads: options.ThreadsOption = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --output folder if it exists.")] = False,
) -> None:
    open_options = {"output": output_name, "max_length": max_length, **options.packing(pack_args, input_shape, precision)}
    ray_options = {name: value for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker), ("batch_size", batch_size)) if value is not None}
    if ray is None and ray_options:
        raise PoprtError(f"--{next(iter(ray_options))} applies with --ray; pass --ray auto|ADDRESS|local, or leave it out")
    if ray is not None and threads:
        raise PoprtError("--threads applies in this process; on Ray pass --threads_per_worker")
    check_threads(threads)
    settings = options.current()
    if output.suffix == ".npy":
        corpus_flags = {"--ray": ray is not None, "--id_column": id_column is not None, "--column": column != "text", "--overwrite": overwrite}
        named = next((flag for flag, on in corpus_flags.items() if on), None)
        if named:
            raise PoprtError(f"{named} applies to a folder of Parquet parts; give --output a folder, not a .npy file")
        embedder = Embedder.open(model, tokenizer, threads=threads, **open_options)
        count = embedder.embed_file(input, output, progress=progress and not settings.quiet)
        if not settings.quiet:
            print(f"{count} lines -> {output} ({count} x {' x '.join(map(str, embedder.dimension))} float32, output '{embedder.output}')")
        return
    check_output(output, overwrite)  # refused before any work
    corpus = read_corpus(input, column, id_column)
    if ray is None:
        embedder = Embedder.open(model, tokenizer, threads=threads, **open_options)
        with progress_bar(progress and not settings.quiet, len(corpus), "sentences") as advance:
            _write(embed_in_process(embedder, corpus), corpus, embedder, output, overwrite, advance)
    else:
        from poprt_lite.apps.ray.cluster import connected, import_ray

        import_ray()
        from poprt_lite.apps.ray.data import check_counts, iter_embedded

        check_counts(**ray_options)
        with connected(ray, verbose=settings.verbose):
            embedder = Embedder.open(model, tokenizer, threads=1, **open_options)  # shipped to the workers
            tables = iter_embedded(corpus, embedder, progress=progress and not settings.quiet, **ray_options)
            _write(tables, corpus, embedder, output, overwrite, lambda n: None)
    if not settings.quiet:
        ids = f"'{id_column}' and " if id_column else ""
        print(f"{len(corpus)} rows -> {output}/ (columns {ids}'{OUTPUT_COLUMN}': {_width(embedder)} float32 each, output '{embedder.output}')")


def _width(embedder: Embedder) -> int:
    return int(np.prod(embedder.dimension))


def _write(tables: Iterator, corpus: Corpus, embedder: Embedder, output: Path, overwrite: bool, advance: Callable[[int], None]) -> None:
    with ParquetParts(output, corpus.output_schema(_width(embedder)), overwrite=overwrite) as parts:
        for table in tables:
            parts.write(table)
            advance(table.num_rows)
