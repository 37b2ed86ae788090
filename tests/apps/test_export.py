"""Model folders: `poprt-lite export FOLDER -o model.onnx`, and a folder as the model of `Embedder.open`
and `poprt-lite embed` (exported into the cache on first use). Every sentence's vector equals
sentence-transformers' `encode` of the same folder (max abs 1e-5, cosine >= 0.99999), in every pooling
mode of its Pooling module, and each packs in every mode with each request equal to the export run alone.

The folder is testdata/st_tiny_folder (`make_models.export_st_folder`: the tiny BERT, mean pooling,
Normalize, max_seq_length 24); the other pooling modes are copies with 1_Pooling/config.json edited.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil

import numpy as np
import onnx
import pytest

from conftest import VOCAB, TESTDATA
from poprt_lite import compile
from poprt_lite.apps import export
from poprt_lite.apps.embed import Embedder
from poprt_lite.cli.main import main
from poprt_lite.compiler import CompileOptions, verify

FOLDER = TESTDATA / "st_tiny_folder"
SENTENCES = ["hello world", "", "of the tiny tokenizer", "x", "of the tiny tokenizer " * 4, "Punctuation, CAPITALS and ümlauts!"]
COPIED = ["config.json", "config_sentence_transformers.json", "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json"]
POOLING_MODES = ["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
DEFAULT_SUITE_MODE = "lasttoken"  # the others run with -m slow
PACK = {
    "unpack_repack": ({"input_ids": (2, 32)}, {"mode": "unpack_repack", "max_valid_num": "6", "segment_max_size": "24"}),
    "attention_mask": ({"input_ids": (2, 32)}, {"mode": "attention_mask", "max_valid_num": "6", "segment_max_size": "24"}),
    "token_stream": ({}, {"mode": "token_stream", "max_valid_num": "6", "segment_max_size": "24", "max_tokens": "64"}),
}



@pytest.fixture
def exporting():
    """Exporting needs '.[export]' (skipped without it, a failure in CI: conftest.py)."""
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def cache(cache_dir, monkeypatch):
    monkeypatch.setenv("POPRT_LITE_CACHE", str(cache_dir))
    return cache_dir


@functools.cache
def encode(folder: str, sentences: tuple[str, ...]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu").encode(list(sentences))


def assert_equals_encode(folder, vectors: np.ndarray) -> None:
    want = encode(str(folder), tuple(SENTENCES))
    assert vectors.shape == want.shape
    np.testing.assert_allclose(vectors, want, atol=1e-5, rtol=0)
    cosine = (vectors * want).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99999


def pooling_folder(tmp_path, mode: str):
    folder = tmp_path / f"st_tiny_{mode}"
    shutil.copytree(FOLDER, folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": mode, "include_prompt": True}))
    return folder


# --------------------------------------------------------------------------------------------- export


@pytest.mark.usefixtures("exporting")
def test_export_writes_one_model_and_the_tokenizer_beside_it(tmp_path, capsys):
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", str(FOLDER), "-o", str(out)]) == 0
    assert capsys.readouterr() == (f"wrote {out} and beside it {', '.join(COPIED)}\n", "")
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["model.onnx", *COPIED])
    graph = onnx.load(out).graph

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    assert dims(graph.input) == {n: ["batch", "sequence"] for n in ("input_ids", "attention_mask", "token_type_ids")}
    outputs = dims(graph.output)
    assert list(outputs) == ["token_embeddings", "sentence_embedding"] and outputs["token_embeddings"] == ["batch", "sequence", 64]
    assert outputs["sentence_embedding"][0] == "batch" and len(outputs["sentence_embedding"]) == 2
    embedder = Embedder.open(out)  # the tokenizer and max_seq_length (24) beside it
    assert embedder.max_length == 24
    assert_equals_encode(FOLDER, embedder.embed(SENTENCES))
    capsys.readouterr()  # sentence-transformers' own loading chatter
    assert main(["export", str(FOLDER), "-o", str(tmp_path / "quiet.onnx"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.usefixtures("exporting")
@pytest.mark.parametrize(
    "mode", [m if m == DEFAULT_SUITE_MODE else pytest.param(m, marks=pytest.mark.slow) for m in POOLING_MODES]
)
def test_every_pooling_mode_equals_encode_and_packs_in_every_mode(tmp_path, mode):
    folder = pooling_folder(tmp_path, mode)
    model = export.cached_export(folder)
    assert_equals_encode(folder, Embedder.open(folder).embed(SENTENCES))
    original = verify.session(onnx.load(model))
    requests = verify.make_requests(np.random.default_rng(0), [20, 3, 9, 1, 12, 7], VOCAB)  # one batch in every mode
    for shape, pack_args in PACK.values():
        packed = compile(model, save=False, options=CompileOptions(input_shape=shape, pack_args=pack_args)).model
        batch, per_request = verify.run_packed(packed, requests)
        assert batch.count == len(requests)
        for spec, (tokens, pooled) in zip(batch.specs, per_request, strict=True):
            want_tokens, want = original.run(None, requests[spec.index])
            np.testing.assert_allclose(pooled, want[0], atol=1e-4, rtol=0)
            np.testing.assert_allclose(tokens, want_tokens[0], atol=1e-4, rtol=0)


@pytest.mark.usefixtures("exporting")
@pytest.mark.slow
def test_a_hugging_face_folder_is_the_transformer_with_mean_pooling(tmp_path):
    """What sentence-transformers makes of a folder without modules.json (save_pretrained's)."""
    folder = tmp_path / "hf"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "2_Normalize", "sentence_*", "config_sentence_*"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert_equals_encode(folder, Embedder.open(folder).embed(SENTENCES))


@pytest.mark.usefixtures("exporting")
@pytest.mark.slow
def test_the_dynamo_exporter(tmp_path):
    out = tmp_path / "model.onnx"
    export.export_folder(pooling_folder(tmp_path, "weightedmean"), out, exporter="dynamo")
    assert onnx.load(out).opset_import[0].version == 18
    assert_equals_encode(tmp_path / "st_tiny_weightedmean", Embedder.open(out).embed(SENTENCES))


# ----------------------------------------------------------------------------------- folder as a model


@pytest.mark.usefixtures("exporting")
def test_a_folder_is_exported_once_into_the_cache(tmp_path, monkeypatch, caplog, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("POPRT_LITE_CACHE", str(cache))
    with caplog.at_level(logging.WARNING, logger="poprt_lite.apps.export"):
        first = Embedder.open(FOLDER)
        again = Embedder.open(FOLDER)
    (entry,) = (cache / "exports").iterdir()
    key = export.content_key(FOLDER, "torchscript")[:16]
    assert entry.name == f"st_tiny_folder.torchscript.{key}" and sorted(p.name for p in entry.iterdir()) == sorted(["model.onnx", *COPIED])
    assert caplog.messages == [f"exporting '{FOLDER}' with torch.onnx (torchscript) into {entry}; later runs read it from there"]
    assert_equals_encode(FOLDER, first.embed(SENTENCES))
    np.testing.assert_array_equal(again.embed(SENTENCES), first.embed(SENTENCES))
    # poprt-lite embed FOLDER: the same vectors, from the cache
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(SENTENCES) + "\n")
    capsys.readouterr()
    assert main(["embed", str(FOLDER), "--input", str(lines), "--output", str(tmp_path / "v.npy"), "--threads", "1", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert_equals_encode(FOLDER, np.load(tmp_path / "v.npy"))
    assert len(list((cache / "exports").iterdir())) == 1


def test_content_key_follows_the_content(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(FOLDER, folder)
    assert export.content_key(folder, "torchscript") == export.content_key(FOLDER, "torchscript") != export.content_key(FOLDER, "dynamo")
    (folder / "1_Pooling" / "config.json").write_text('{"embedding_dimension": 64, "pooling_mode": "max"}')
    assert export.content_key(folder, "torchscript") != export.content_key(FOLDER, "torchscript")


def test_resolve_model_leaves_files_alone(tmp_path):
    assert export.resolve_model(tmp_path / "model.onnx") == tmp_path / "model.onnx"  # missing: the caller says so
    assert export.resolve_model("a.popef") == export.Path("a.popef")


def test_bad_folders_and_options(tmp_path, cache, capsys):
    cached = sorted((cache / "exports").glob("*")) if (cache / "exports").exists() else []
    empty = tmp_path / "empty"
    empty.mkdir()
    exported = tmp_path / "exported"  # what an export writes: config files and the ONNX, no weights
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    (exported / "model.onnx").write_bytes(b"")
    cases = [
        (["export", str(tmp_path / "none"), "-o", "m.onnx"], f"model folder '{tmp_path / 'none'}' does not exist"),
        (
            ["export", str(empty), "-o", "m.onnx"],
            f"'{empty}' is not a model folder: it has no modules.json (sentence-transformers) or config.json (Hugging Face); "
            "pass the folder the model was saved to",
        ),
        (
            ["export", str(exported), "-o", "m.onnx"],
            f"model folder '{exported}' holds no weights (*.safetensors or *.bin); pass the ONNX model itself ({exported / 'model.onnx'})",
        ),
        (["export", str(FOLDER), "-o", str(tmp_path / "m.onnx"), "--exporter", "onnx"], "--exporter must be one of torchscript, dynamo, got 'onnx'"),
        (["export", str(FOLDER), "-o", str(empty)], f"output '{empty}' is a folder; give the model file to write, e.g. {empty / 'model.onnx'}"),
        (
            ["embed", str(empty), "--input", "l.txt", "--output", "v.npy"],
            f"'{empty}' is not a model folder: it has no modules.json (sentence-transformers) or config.json (Hugging Face); "
            "pass the folder the model was saved to",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert capsys.readouterr() == ("", f"error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exported"] and not any(empty.iterdir())
    assert (sorted((cache / "exports").glob("*")) if (cache / "exports").exists() else []) == cached  # nothing exported


@pytest.mark.usefixtures("exporting")
def test_a_folder_that_does_not_load_leaves_nothing_behind(tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(FOLDER, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", str(broken), "-o", str(out)]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == "" and err.startswith(f"error: sentence-transformers cannot load '{broken}' (") and err.count("\n") == 1
    assert not any((tmp_path / "out").iterdir())


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("POPRT_LITE_CACHE", str(blocked))
    assert main(["embed", str(FOLDER), "--input", "l.txt", "--output", "v.npy"]) == 2
    assert capsys.readouterr() == (
        "", f"error: cannot write the export cache '{blocked / 'exports'}' (Not a directory); set POPRT_LITE_CACHE to a writable folder\n"
    )
