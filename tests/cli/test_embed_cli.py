"""`poprt-lite embed`: lines in, a .npy of one embedding per line out; one-line errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import TESTDATA, model_path
from poprt_lite.cli.main import main
from poprt_lite.apps.embed import Embedder

TOKENIZER = str(TESTDATA / "tiny_tokenizer.json")
MODEL = str(model_path("st_mean_norm_torchscript"))


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_lines_to_npy(tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("hello world\n\nof the tiny tokenizer\n")
    out = tmp_path / "vectors.npy"
    code, stdout, err = cli(
        capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(lines), "--output", str(out),
        "--pack_args", "mode=attention_mask", "max_valid_num=4", "segment_max_size=24",
        "--input_shape", "input_ids=2,24", "attention_mask=2,24", "token_type_ids=2,24",
    )
    assert code == 0, err
    assert stdout == f"3 lines -> {out} (3 x 64 float32, output 'sentence_embedding')\n"
    embedder = Embedder.open(MODEL, TOKENIZER)  # token_stream: another packing, the same answers
    np.testing.assert_allclose(np.load(out), embedder.embed(["hello world", "", "of the tiny tokenizer"]), atol=1e-5, rtol=0)


def test_embed_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("hello\n")
    out = tmp_path / "vectors.npy"
    code, stdout, err = cli(capsys, "embed", MODEL, "--input", str(lines), "--output", str(out))
    assert code == 2 and stdout == ""
    assert err == f"error: tokenizer '{TESTDATA / 'tokenizer.json'}' does not exist; pass a tokenizer.json or the model folder holding it\n"
    code, _, err = cli(capsys, "embed", str(tmp_path / "none.onnx"), "--input", str(lines), "--output", str(out))
    assert code == 2 and err == f"error: model '{tmp_path / 'none.onnx'}' does not exist; pass an artifact, an .onnx file or a model folder\n"
    code, _, err = cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(lines), "--output", str(out), "--pack_args", "mode=sideways")
    assert code == 2 and err.startswith("error: ") and "mode" in err and err.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt"]


def corpus_rows(folder) -> tuple[list, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    return ids, np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_embed_a_corpus_into_parquet_parts(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    sentences = ["hello world", "", "of the tiny tokenizer", "x"] * 5
    pq.write_table(pa.table({"id": list(range(100, 120)), "body": sentences}), tmp_path / "c.parquet")
    (tmp_path / "c.txt").write_text("\n".join(sentences) + "\n")
    want = Embedder.open(MODEL, TOKENIZER).embed(sentences)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(tmp_path / "c.parquet"), "--output", str(out), "--column", "body", "--id_column", "id")
    assert code == 0, err
    assert stdout == f"20 rows -> {out}/ (columns 'id' and 'embedding': 64 float32 each, output 'sentence_embedding')\n"
    ids, vectors = corpus_rows(out)
    assert ids == list(range(100, 120)) and [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    np.testing.assert_allclose(vectors, want, atol=1e-6, rtol=0)

    code, stdout, err = cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(tmp_path / "c.txt"), "--output", str(out), "--overwrite", "--quiet")
    assert code == 0 and stdout == "" and err == ""
    ids, vectors = corpus_rows(out)
    assert ids is None and vectors.shape == (20, 64)  # rows in line order
    np.testing.assert_allclose(vectors, want, atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "c.txt", "out"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "{d}/out"], "error: output folder '{d}/out' exists; pass --overwrite to replace it\n"),
        (["--output", "{d}/new", "--column", "n"], "error: column 'n' of '{d}/c.parquet' holds int64 values, not text; pass --column with the column that holds the text\n"),
        (["--output", "{d}/new", "--column", "nope"], "error: '{d}/c.parquet' has no column 'nope'; its columns are: n, text (pass --column NAME)\n"),
        (["--output", "{d}/new", "--workers", "2"], "error: --workers applies with --ray; pass --ray auto|ADDRESS|local, or leave it out\n"),
        (["--output", "{d}/v.npy", "--id_column", "n"], "error: --id_column applies to a folder of Parquet parts; give --output a folder, not a .npy file\n"),
        (["--output", "{d}/new", "--ray", "local", "--threads", "2"], "error: --threads applies in this process; on Ray pass --threads_per_worker\n"),
    ],
)
def test_embed_corpus_refusals_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2], "text": ["a", None]}), tmp_path / "c.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    argv = [a.format(d=tmp_path) for a in args]
    code, stdout, err = cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(tmp_path / "c.parquet"), *argv)
    assert (code, stdout, err) == (2, "", message.format(d=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "out"] and (tmp_path / "out" / "mine.txt").read_text() == "kept"


def test_a_null_text_fails_the_job_before_anything_is_written(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "c.parquet")
    code, stdout, err = cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(tmp_path / "c.parquet"), "--output", str(tmp_path / "out"))
    assert (code, stdout) == (2, "")
    assert err == f"error: column 'text' of '{tmp_path / 'c.parquet'}' holds a null at row 2, not text; give every row a string (the empty one for no text)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]


def embed_lines(capsys, tmp_path, *flags: str) -> tuple[int, str, str]:
    """`poprt-lite embed` of two lines, the second longer than the tiny tokenizer's 24 tokens."""
    lines = tmp_path / "lines.txt"
    lines.write_text("hello world\n" + "of the tiny tokenizer " * 3 + "\n")
    return cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(lines), "--output", str(tmp_path / "v.npy"), *flags)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("poprt_lite") and r.levelno >= logging.WARNING]


def test_embed_threads_notice_and_quiet(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code, stdout, err = embed_lines(capsys, tmp_path, "--threads", "1")
    assert (code, err) == (0, "")
    assert stdout == f"2 lines -> {tmp_path / 'v.npy'} (2 x 64 float32, output 'sentence_embedding')\n"
    assert warnings_of(caplog) == ["1 of 2 sentences were longer than 24 tokens and were truncated (--max_length)"]
    vectors = np.load(tmp_path / "v.npy")
    (tmp_path / "v.npy").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code, stdout, err = embed_lines(capsys, tmp_path, "--threads", "1", "--quiet")
    assert (code, stdout, err, warnings_of(caplog)) == (0, "", "", [])
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), vectors)


def test_threads_option_is_one_declaration():
    import inspect

    from poprt_lite.cli import bench, embed, options

    for command in (embed.embed_command, bench.bench_command):
        assert inspect.signature(command).parameters["threads"].annotation in (options.ThreadsOption, "options.ThreadsOption")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--threads", "-1"], "--threads must be a whole number >= 0 (0: one per core), got -1"),
        (["--threads", "2.5"], "Invalid value for '--threads': Input should be a valid integer, unable to parse string as an integer"),
        (["--max_length", "-1"], "--max_length must be a whole number >= 1, got -1"),
        (["--max_length", "0"], "--max_length must be a whole number >= 1, got 0"),
    ],
)
def test_embed_threads_and_max_length_are_checked(tmp_path, capsys, flags, message):
    code, stdout, err = embed_lines(capsys, tmp_path, *flags)
    assert (code, stdout, err) == (2, "", f"error: {message}\n")
    assert not (tmp_path / "v.npy").exists()
