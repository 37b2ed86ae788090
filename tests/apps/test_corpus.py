"""A corpus on disk: Parquet, JSON Lines and text lines read and checked; embeddings written as Parquet parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apps.test_embed import MODEL, SENTENCES, TOKENIZER, artifact, assert_equal_to_original
from poprt_lite.apps.corpus import ParquetParts, check_output, embed_in_process, embedding_array, read_corpus
from poprt_lite.apps.embed import Embedder
from poprt_lite.errors import PoprtError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IDS = [f"doc-{i}" for i in range(len(SENTENCES))]


def write_inputs(folder) -> dict[str, object]:
    """The same rows as Parquet, JSON Lines and text lines (the text file has no ids)."""
    pq.write_table(pa.table({"id": IDS, "body": SENTENCES, "n": list(range(len(SENTENCES)))}), folder / "c.parquet")
    (folder / "c.jsonl").write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in zip(IDS, SENTENCES, strict=True)))
    (folder / "c.txt").write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    return {"parquet": folder / "c.parquet", "jsonl": folder / "c.jsonl", "txt": folder / "c.txt"}


def test_the_three_formats_read_the_same_rows(tmp_path):
    paths = write_inputs(tmp_path)
    for kind in ("parquet", "jsonl"):
        corpus = read_corpus(paths[kind], "body", "id")
        assert corpus.table.column_names == ["id", "body"] and corpus.texts() == SENTENCES
        assert corpus.table.column("id").to_pylist() == IDS
    lines = read_corpus(paths["txt"], "body")
    assert lines.table.column_names == ["body"] and lines.texts() == SENTENCES and lines.id_column is None
    assert SENTENCES[1] == "" and lines.texts(1, 2) == [""]  # an empty line is the empty sentence


@pytest.mark.parametrize(
    "make, column, id_column, message",
    [
        (lambda d: d / "none.parquet", "text", None, "input file '{d}/none.parquet' does not exist"),
        (lambda d: _write(d / "c.csv", "text\nhello\n"), "text", None,
         "input '{d}/c.csv' must be Parquet (.parquet), JSON Lines (.jsonl) or text lines (.txt)"),
        (lambda d: _parquet(d, {"id": [1], "body": ["a"]}), "text", None,
         "'{d}/c.parquet' has no column 'text'; its columns are: id, body (pass column NAME)"),
        (lambda d: _parquet(d, {"id": [1], "body": ["a"]}), "body", "key", "'{d}/c.parquet' has no column 'key'; its columns are: id, body (pass id_column NAME)"),
        (lambda d: _parquet(d, {"id": [1], "body": ["a"]}), "id", None,
         "column 'id' of '{d}/c.parquet' holds int64 values, not text; pass column with the column that holds the text"),
        (lambda d: _parquet(d, {"body": ["a", None, "c"]}), "body", None,
         "column 'body' of '{d}/c.parquet' holds a null at row 1, not text; give every row a string (the empty one for no text)"),
        (lambda d: _parquet(d, {"id": [1, None], "body": ["a", "b"]}), "body", "id", "id column 'id' of '{d}/c.parquet' holds a null at row 1; every row needs an id"),
        (lambda d: _parquet(d, {"body": ["a"]}), "body", "body", "id_column and column name the same column 'body'"),
        (lambda d: _write(d / "c.jsonl", '{"text": "a"}\n{"text": 5}\n'), "text", None,
         "cannot read '{d}/c.jsonl' as JSON Lines (JSON parse error: Column(/text) changed from string to number in row 1)"),
        (lambda d: _write(d / "c.jsonl", '{"text": "a"}\n{"other": "b"}\n'), "text", None,
         "column 'text' of '{d}/c.jsonl' holds a null at row 1, not text; give every row a string (the empty one for no text)"),
        (lambda d: _write(d / "c.parquet", "not parquet"), "text", None,
         "cannot read '{d}/c.parquet' as Parquet (Could not open Parquet input source '{d}/c.parquet': Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.)"),
        (lambda d: _write(d / "c.txt", "a\n"), "text", "id",
         "id_column needs a Parquet or JSON Lines input; the lines of '{d}/c.txt' have no columns (their order is their id)"),
        (lambda d: (d / "c.txt").write_bytes(b"ok\n\xff\n") and d / "c.txt", "text", None, "'{d}/c.txt' is not UTF-8 text (invalid start byte at byte 3)"),
    ],
)
def test_bad_corpora_are_refused_in_one_line(tmp_path, make, column, id_column, message):
    path = make(tmp_path)
    with pytest.raises(PoprtError) as err:
        read_corpus(path, column, id_column)
    assert str(err.value) == message.format(d=tmp_path)


def _write(path, text):
    path.write_text(text)
    return path


def _parquet(folder, columns):
    pq.write_table(pa.table(columns), folder / "c.parquet")
    return folder / "c.parquet"


def test_embed_in_process_gives_each_row_its_sentence_embedding(tmp_path):
    corpus = read_corpus(write_inputs(tmp_path)["parquet"], "body", "id")
    embedder = Embedder(artifact(MODEL, "token_stream"), TOKENIZER)
    tables = list(embed_in_process(embedder, corpus, chunk=7))  # 18 rows: chunks of 7, 7, 4
    assert [t.num_rows for t in tables] == [7, 7, 4]
    rows = pa.concat_tables(tables)
    assert rows.schema == corpus.output_schema(64) and str(rows.schema.field("embedding").type) == "fixed_size_list<item: float>[64]"
    assert rows.column("id").to_pylist() == IDS
    assert_equal_to_original(embedder, SENTENCES, np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)))


def test_parts_hold_every_row_in_order_and_appear_only_when_complete(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("embedding", pa.list_(pa.float32(), 2), nullable=False)])
    vectors = np.arange(20, dtype=np.float32).reshape(10, 2)

    def rows(start, stop):
        return pa.Table.from_arrays([pa.array(range(start, stop), pa.int64()), embedding_array(vectors[start:stop])], schema=schema)

    out = tmp_path / "out"
    with ParquetParts(out, schema, rows_per_part=4) as parts:
        for start, stop in ((0, 3), (3, 9), (9, 10)):
            parts.write(rows(start, stop))
            assert not out.exists()  # nothing looks complete before the end
    assert (parts.rows, parts.parts) == (10, 3)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(out / f"part-0000{i}.parquet").num_rows for i in range(3)] == [4, 4, 2]
    written = pq.read_table(out)
    assert written.schema == schema and written.column("id").to_pylist() == list(range(10))
    np.testing.assert_array_equal(np.stack(written.column("embedding").to_numpy(zero_copy_only=False)), vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(PoprtError) as err:
        ParquetParts(out, schema)
    assert str(err.value) == f"output folder '{out}' exists; pass overwrite to replace it"
    with pytest.raises(RuntimeError, match="worker lost"), ParquetParts(out, schema, overwrite=True) as parts:
        parts.write(rows(0, 5))
        raise RuntimeError("worker lost")
    assert pq.read_table(out).num_rows == 10 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old output stays
    with ParquetParts(out, schema, overwrite=True) as parts:
        parts.write(rows(0, 5))
    assert pq.read_table(out).column("id").to_pylist() == list(range(5)) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with ParquetParts(tmp_path / "empty", schema):
        pass
    assert pq.read_table(tmp_path / "empty").schema == schema and pq.read_table(tmp_path / "empty").num_rows == 0
    (tmp_path / "file").write_text("x")
    with pytest.raises(PoprtError) as err:
        check_output(tmp_path / "file", overwrite=True)
    assert str(err.value) == f"output '{tmp_path / 'file'}' is a file; pass a folder for the Parquet parts"
