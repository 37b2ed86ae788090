"""A corpus on disk: text rows in (Parquet, JSON Lines or text lines), embeddings out (a folder of
Parquet part files), with pyarrow (`pip install 'poprt-lite[text]'`).

`read_corpus(path, column, id_column)` reads the whole input into one Arrow table and checks it
before any work starts: the column exists and holds text (strings, no nulls), and so does the id
column if one is named. A text file is one row per line (an empty line is the empty sentence) and
has no id column: the row order is the id. `ParquetParts` writes the result (the id column, if any,
and the embedding as a fixed-size list of float32) into `part-00000.parquet`, ... in a temporary
folder beside the output and renames it into place only when every row is written, so a failed or
interrupted job leaves no folder that looks complete. Rows keep the input's order across the parts
(read the folder in file-name order).

`embed_in_process` embeds a corpus here, chunk by chunk; `poprt_lite.apps.ray.data.iter_embedded`
does the same job on a Ray cluster and yields the same tables.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poprt_lite.errors import PoprtError, one_line, option

if TYPE_CHECKING:
    import pyarrow as pa

    from poprt_lite.apps.embed import Embedder

FORMATS = (".parquet", ".jsonl", ".txt")
OUTPUT_COLUMN = "embedding"
ROWS_PER_PART = 65536  # a 384-float embedding: ~100 MB per part
CHUNK = 4096  # sentences embedded at a time in process (Embedder.iter_embed's chunk)


def pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise PoprtError("reading and writing a corpus needs pyarrow: pip install 'poprt-lite[text]'") from None
    return pyarrow


@dataclass(frozen=True)
class Corpus:
    """The rows to embed: `table` holds `column` (text) and `id_column` (if any), checked."""

    path: Path
    table: "pa.Table"
    column: str
    id_column: str | None

    def __len__(self) -> int:
        return self.table.num_rows

    def texts(self, start: int = 0, stop: int | None = None) -> list[str]:
        return self.table.column(self.column).slice(start, None if stop is None else stop - start).to_pylist()

    def output_schema(self, dimension: int, output_column: str = OUTPUT_COLUMN) -> "pa.Schema":
        """The schema of the embedded rows: the id column (if any) and the embeddings."""
        pa = pyarrow()
        fields = [self.table.schema.field(self.id_column)] if self.id_column else []
        return pa.schema([*fields, pa.field(output_column, pa.list_(pa.float32(), dimension), nullable=False)])


def read_corpus(path: str | os.PathLike, column: str = "text", id_column: str | None = None) -> Corpus:
    """Read and check the corpus at `path` (by its extension: .parquet, .jsonl or .txt)."""
    pa = pyarrow()
    path = Path(path)
    if not path.is_file():
        raise PoprtError(f"input file '{path}' does not exist")
    kind = path.suffix.lower()
    if kind not in FORMATS:
        raise PoprtError(f"input '{path}' must be Parquet (.parquet), JSON Lines (.jsonl) or text lines (.txt)")
    if kind == ".txt":
        if id_column is not None:
            raise PoprtError(f"{option('id_column')} needs a Parquet or JSON Lines input; the lines of '{path}' have no columns (their order is their id)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise PoprtError(f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return Corpus(path, pa.table({column: pa.array(lines, pa.string())}), column, None)
    table = _read_table(path, kind)
    names = [name for name in (id_column, column) if name is not None]
    for name, spelled in ((column, option("column")), (id_column, option("id_column"))):
        if name is not None and name not in table.column_names:
            raise PoprtError(f"'{path}' has no column '{name}'; its columns are: {', '.join(table.column_names)} (pass {spelled} NAME)")
    if id_column == column:
        raise PoprtError(f"{option('id_column')} and {option('column')} name the same column '{column}'")
    table = table.select(names)
    problem = text_problem(table.column(column), column, source=str(path))
    if problem:
        raise PoprtError(problem)
    if id_column is not None and table.column(id_column).null_count:
        row = first_null(table.column(id_column))
        raise PoprtError(f"id column '{id_column}' of '{path}' holds a null at row {row}; every row needs an id")
    return Corpus(path, table, column, id_column)


def _read_table(path: Path, kind: str) -> "pa.Table":
    pa = pyarrow()
    try:
        if kind == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.json as pj

        return pj.read_json(path)
    except (pa.ArrowException, OSError) as exc:
        what = "Parquet" if kind == ".parquet" else "JSON Lines"
        raise PoprtError(f"cannot read '{path}' as {what} ({one_line(exc, with_type=False)})") from None


def text_problem(values: "pa.Array | pa.ChunkedArray", column: str, *, source: str = "", first_row: int | None = 0) -> str | None:
    """Why `values` (the column `column`, of `source`) are not text to embed, or None: a type other
    than string, or a null (reported at its row counted from `first_row`; None: not reported)."""
    pa = pyarrow()
    kind = values.type
    where = f" of '{source}'" if source else ""
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return f"column '{column}'{where} holds {kind} values, not text; pass {option('column')} with the column that holds the text"
    if values.null_count:
        row = "" if first_row is None else f" at row {first_row + first_null(values)}"
        return f"column '{column}'{where} holds a null{row}, not text; give every row a string (the empty one for no text)"
    return None


def first_null(values: "pa.Array | pa.ChunkedArray") -> int:
    import pyarrow.compute as pc

    return int(pc.index(pc.is_null(values), True).as_py())


def embedding_array(vectors: np.ndarray) -> "pa.FixedSizeListArray":
    """`[n, *dimension]` float32 embeddings as one fixed-size list of float32 per row."""
    pa = pyarrow()
    flat = np.ascontiguousarray(vectors, np.float32).reshape(len(vectors), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def embed_in_process(embedder: "Embedder", corpus: Corpus, output_column: str = OUTPUT_COLUMN, chunk: int = CHUNK) -> Iterator["pa.Table"]:
    """Embed `corpus` here, `chunk` rows at a time (each packed offline by `Embedder.embed`); yield
    the embedded rows (`Corpus.output_schema`) in order."""
    schema = corpus.output_schema(int(np.prod(embedder.dimension)), output_column)
    for start in range(0, len(corpus), chunk):
        rows = corpus.table.slice(start, chunk)
        vectors = embedder.embed(rows.column(corpus.column).to_pylist())
        ids = [rows.column(corpus.id_column)] if corpus.id_column else []
        yield pyarrow().Table.from_arrays([*ids, embedding_array(vectors)], schema=schema)


def check_output(folder: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder, refused if something is there already (unless `overwrite` and it is a folder)."""
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise PoprtError(f"output '{folder}' is a file; pass a folder for the Parquet parts")
        if not overwrite:
            raise PoprtError(f"output folder '{folder}' exists; pass {option('overwrite')} to replace it")
    return folder


class ParquetParts:
    """Write tables of one schema into a folder of Parquet parts of at most `rows_per_part` rows,
    renamed into place when complete (see the module docstring). Use as a context manager: an
    exception inside removes everything written."""

    def __init__(self, folder: str | os.PathLike, schema: "pa.Schema", *, overwrite: bool = False, rows_per_part: int = ROWS_PER_PART) -> None:
        self.folder = check_output(folder, overwrite)
        self.schema = schema
        self.rows_per_part = rows_per_part
        self.rows = 0
        self.parts = 0
        self._staging = self.folder.parent / f".{self.folder.name}.partial-{uuid.uuid4().hex[:8]}"
        self._writer: Any = None
        self._part_rows = 0

    def __enter__(self) -> "ParquetParts":
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._staging.mkdir()
        except OSError as exc:
            raise PoprtError(f"cannot write '{self.folder}' ({exc.strerror or exc})") from exc
        return self

    def write(self, table: "pa.Table") -> None:
        """Append `table`'s rows (its schema must be this writer's)."""
        if not table.schema.equals(self.schema):
            raise ValueError(f"rows of schema {table.schema} written to parts of schema {self.schema}")
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open_part()
            take = min(table.num_rows - start, self.rows_per_part - self._part_rows)
            self._writer.write_table(table.slice(start, take))
            self._part_rows += take
            self.rows += take
            start += take
            if self._part_rows == self.rows_per_part:
                self._close_part()

    def _open_part(self) -> None:
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(self._staging / f"part-{self.parts:05d}.parquet", self.schema)
        self.parts += 1
        self._part_rows = 0

    def _close_part(self) -> None:
        self._writer.close()
        self._writer = None

    def __exit__(self, kind, exc, traceback) -> None:
        try:
            if exc is None:
                if self.parts == 0:  # no rows: one empty part still gives readers the schema
                    self._open_part()
                if self._writer is not None:
                    self._close_part()
                self._commit()
        finally:
            if self._writer is not None:
                self._writer.close()
            shutil.rmtree(self._staging, ignore_errors=True)

    def _commit(self) -> None:
        replaced = self.folder.parent / f".{self.folder.name}.replaced-{uuid.uuid4().hex[:8]}"
        try:
            if self.folder.exists():  # overwrite: checked when this writer was made
                self.folder.rename(replaced)
            self._staging.rename(self.folder)
        except OSError as exc:
            if replaced.exists() and not self.folder.exists():
                replaced.rename(self.folder)  # the folder replaced stays as it was
            raise PoprtError(f"cannot write '{self.folder}' ({exc.strerror or exc})") from exc
        shutil.rmtree(replaced, ignore_errors=True)
