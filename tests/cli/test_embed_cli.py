"""`poprt-lite embed`: lines in, a .npy of one embedding per line out; one-line errors."""

from __future__ import annotations

import numpy as np

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
    assert code == 2 and err == f"error: model '{tmp_path / 'none.onnx'}' does not exist; pass an artifact or an .onnx file\n"
    code, _, err = cli(capsys, "embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(lines), "--output", str(out), "--pack_args", "mode=sideways")
    assert code == 2 and err.startswith("error: ") and "mode" in err and err.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt"]
