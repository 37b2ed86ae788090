"""Batch embedding on Ray Data.

    import ray
    from poprt_lite.apps.ray import embed_dataset

    ds = ray.data.read_parquet("s3://bucket/corpus/")              # a column "text"
    embedded = embed_dataset(ds, "out/executable.popef", "all-MiniLM-L6-v2/", workers=8)
    embedded.write_parquet("s3://bucket/embeddings/")              # + a column "embedding"

`embed_dataset` opens the model on the driver (an artifact, a packed .onnx, or an exported model
packed here once, as `Embedder.open` takes it), puts the artifact and the configured tokenizer into
Ray's object store once (`ShippedEmbedder`), and adds a `map_batches` stage on a pool of `workers`
actors (`EmbedBatches`, `compute=ActorPoolStrategy`). Each actor fetches the artifact once, opens one
onnxruntime session of `threads_per_worker` threads, and embeds each batch of `batch_size` rows (or
each block of the dataset whole) as `Embedder.embed` does in one process: tokenized, planned offline
(`run_requests`) and run packed.
The actors are restartable: Ray Data starts a pool's actors with `max_restarts=-1` and
`max_task_retries=-1` (its defaults; Ray 2.60 deprecates passing them through `map_batches`), so a
worker that dies is started again and its batches rerun: a lost worker costs time, never rows.

Each actor reserves `threads_per_worker` CPUs. An actor pool that reserves every CPU of the cluster
leaves none for the pipeline's other tasks (reads, writes: a known Ray Data hang,
ray-project/ray#44687): give the pool fewer workers than CPUs when Ray Data reads or writes files, or
feed it from the driver as `iter_embedded` does.

`iter_embedded` runs a checked `Corpus` (apps/corpus.py) through it for `poprt-lite embed --ray`:
the driver reads the input and writes the parts, the cluster embeds, so neither needs storage the
workers share. The driver cuts the corpus into blocks of about equal work (`corpus_blocks`), as many
as `batch_size` rows would give rounded up to a multiple of the workers, and each actor call embeds
one block whole: blocks of equal rows differ in cost with their share of long texts, and the actor
that draws the costly last ones keeps the job running while the others idle.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.data

from poprt_lite.apps.corpus import OUTPUT_COLUMN, Corpus, embedding_array, text_problem
from poprt_lite.apps.embed import Embedder
from poprt_lite.apps.ray.shipped import ShippedArtifact
from poprt_lite.errors import PoprtError, option

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_BATCH_SIZE = 1024  # rows per map_batches call (on average): seconds of work for MiniLM on one thread


@dataclass(frozen=True)
class ShippedEmbedder:
    """What a worker needs to open an `Embedder`, as it travels through the object store: the
    artifact and the tokenizer configured on the driver."""

    artifact: ShippedArtifact
    tokenizer: Any  # tokenizers.Tokenizer (it pickles)
    output: str
    max_length: int

    @classmethod
    def of(cls, embedder: Embedder) -> "ShippedEmbedder":
        return cls(ShippedArtifact.of(embedder.artifact), embedder.tokenizer, embedder.output, embedder.max_length)

    def open(self, threads: int) -> Embedder:
        return Embedder(self.artifact.open(), self.tokenizer, output=self.output, max_length=self.max_length, threads=threads)


class EmbedBatches:
    """The map_batches callable: one per actor, holding one Embedder for the actor's life."""

    def __init__(self, shipped: Sequence[ray.ObjectRef], column: str, output_column: str, keep_columns: Sequence[str] | None, threads: int) -> None:
        # The reference comes nested, so the actor fetches the artifact itself (again after a restart).
        (reference,) = shipped
        self.embedder = ray.get(reference).open(threads)
        self.column, self.output_column, self.keep_columns = column, output_column, keep_columns

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        if self.column not in batch.column_names:
            raise PoprtError(f"the dataset has no column '{self.column}'; its columns are: {', '.join(batch.column_names)}")
        texts = batch.column(self.column)
        problem = text_problem(texts, self.column, first_row=None)
        if problem:
            raise PoprtError(problem)
        vectors = self.embedder.embed(texts.to_pylist())
        kept = batch if self.keep_columns is None else batch.select(list(self.keep_columns))
        return kept.append_column(self.output_column, embedding_array(vectors))


def embed_dataset(
    ds: ray.data.Dataset,
    model: str | os.PathLike | Embedder,
    tokenizer: str | os.PathLike | None = None,
    *,
    column: str = "text",
    output_column: str = OUTPUT_COLUMN,
    keep_columns: Sequence[str] | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    **open_options: Any,
) -> ray.data.Dataset:
    """`ds` with `output_column` added: each row's embedding of its `column` (a fixed-size list of
    float32). `model` is an `Embedder` or what `Embedder.open` takes (with `tokenizer` and
    `open_options`: output, max_length, pack_args, input_shape); `keep_columns` selects the input
    columns carried over (default: all). `workers` actors (default: as many as the cluster's CPUs
    hold), each of `threads_per_worker` onnxruntime threads and as many CPUs, embed `batch_size` rows
    per call (None: each block of `ds` whole in one call, as in Ray's map_batches). Lazy, as Ray Data
    is: the work runs when the result is consumed. A worker's refusal (a value that is not text)
    reaches the driver inside Ray's exceptions: `user_error` finds it."""
    check_counts(workers=workers, threads_per_worker=threads_per_worker, batch_size=batch_size)
    embedder = model if isinstance(model, Embedder) else Embedder.open(model, tokenizer, threads=1, **open_options)
    workers = pool_size(workers, threads_per_worker)
    shipped = ray.put(ShippedEmbedder.of(embedder))
    return ds.map_batches(
        EmbedBatches,
        fn_constructor_args=([shipped], column, output_column, keep_columns, threads_per_worker),
        batch_size=batch_size,
        batch_format="pyarrow",
        # one batch in flight per actor: a batch is seconds of work, so queueing more on an actor
        # gains nothing and leaves the last ones waiting behind a busy actor while another idles
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=threads_per_worker,
    )


def iter_embedded(
    corpus: Corpus,
    embedder: Embedder,
    *,
    output_column: str = OUTPUT_COLUMN,
    workers: int | None = None,
    threads_per_worker: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> Iterator["pa.Table"]:
    """Embed `corpus` on the connected Ray cluster; yield the embedded rows (`Corpus.output_schema`)
    in the corpus's order, as `corpus.embed_in_process` does. The driver's rows reach the actors
    through the object store in blocks of about equal work (`corpus_blocks`: `batch_size` rows on
    average), one block per actor call; the results come back to the driver."""
    check_counts(workers=workers, threads_per_worker=threads_per_worker, batch_size=batch_size)
    if not len(corpus):
        return
    workers = pool_size(workers, threads_per_worker)
    ds = ray.data.from_arrow(corpus_blocks(corpus, batch_size, workers))
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = progress
    ds.context.raise_original_map_exception = True  # a worker's PoprtError, not Ray's UserCodeException
    embedded = embed_dataset(
        ds, embedder, column=corpus.column, output_column=output_column, keep_columns=[corpus.id_column] if corpus.id_column else [],
        workers=workers, threads_per_worker=threads_per_worker, batch_size=None,  # each block whole
    )
    schema = corpus.output_schema(int(np.prod(embedder.dimension)), output_column)
    try:
        for table in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table.cast(schema)
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        raise error from None


def corpus_blocks(corpus: Corpus, batch_size: int, workers: int) -> list["pa.Table"]:
    """`corpus.table` cut into consecutive blocks of about equal work, as many as blocks of
    `batch_size` rows would be, rounded up to a multiple of `workers` (at most one per row). A row's
    work is its text's characters plus one (the row itself: its special tokens, its share of the
    call), which the driver counts without tokenizing; a block's work differs from the mean by less
    than the largest row's. A row with more work than a block's share takes the place of the blocks
    it spans: there are fewer blocks then."""
    import pyarrow.compute as pc

    batches = -(-len(corpus) // batch_size)
    count = min(len(corpus), -(-batches // workers) * workers)
    work = np.concatenate([[0], np.cumsum(pc.utf8_length(corpus.table.column(corpus.column)).to_numpy() + 1)])
    # block k ends at the first row boundary whose work before it reaches k shares of the whole
    bounds = np.unique(np.concatenate([[0], np.searchsorted(work, work[-1] * np.arange(1, count + 1) / count)])).tolist()
    return [corpus.table.slice(start, end - start) for start, end in itertools.pairwise(bounds)]


def pool_size(workers: int | None, threads_per_worker: int) -> int:
    """`workers`, or (None) as many actors of `threads_per_worker` CPUs as the cluster holds."""
    if workers is not None:
        return workers
    return max(1, int(ray.cluster_resources().get("CPU", 1) // threads_per_worker))


def check_counts(workers: int | None = None, threads_per_worker: int | None = None, batch_size: int | None = None) -> None:
    """Refuse a count below 1 (None: not given)."""
    named = ((option("workers"), workers), (option("threads_per_worker"), threads_per_worker), (option("batch_size"), batch_size))
    for name, value in named:
        if value is not None and value < 1:
            raise PoprtError(f"{name} must be >= 1, got {value}")


def user_error(exc: BaseException) -> PoprtError | None:
    """The PoprtError a worker raised (its first line: Ray appends its retry notes), found in the chain
    of exceptions Ray raises on the driver; None if there is none. Ray Data passes the worker's own
    exception on only with `ds.context.raise_original_map_exception = True`."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PoprtError) and not isinstance(current, ray.exceptions.RayTaskError):
            return PoprtError(str(current).splitlines()[0])
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None
