"""Text in, vectors out: every sentence's embedding equals the original model's run on its tokens alone."""

from __future__ import annotations

import functools
import json
import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TESTDATA, model_path
from poprt_lite import compile, ir
from poprt_lite.ir.artifact import converted_fields, in_memory, write_artifact
from poprt_lite.compiler import CompileOptions
from poprt_lite.apps.embed import Embedder, load_tokenizer
from poprt_lite.errors import PoprtError

TOKENIZER = TESTDATA / "tiny_tokenizer.json"  # its own truncation: 24 tokens, padding to 32 (switched off)
MODEL = "st_mean_norm_torchscript"
SENTENCES = [
    "hello world",
    "",
    "of the tiny tokenizer",
    "a sentence long enough to be cut at the tokenizer limit of twenty four tokens by truncation for sure",
    "x",
    "Punctuation, CAPITALS and ümlauts!",
] * 3
PACK_ARGS = {
    "token_stream": ({"mode": "token_stream", "max_valid_num": "8", "max_tokens": "64", "segment_max_size": "24"}, {}),
    "attention_mask": ({"mode": "attention_mask", "max_valid_num": "8", "segment_max_size": "24"}, {"input_ids": (2, 32), "attention_mask": (2, 32), "token_type_ids": (2, 32)}),
    "unpack_repack": ({"mode": "unpack_repack", "max_valid_num": "8", "segment_max_size": "24"}, {"input_ids": (2, 32), "attention_mask": (2, 32), "token_type_ids": (2, 32)}),
}


@functools.cache
def artifact(name: str, mode: str):
    pack_args, shape = PACK_ARGS[mode]
    model = compile(model_path(name), save=False, options=CompileOptions(input_shape=shape, pack_args=pack_args)).model
    return in_memory(model_path(name), model, converted_fields(model, model_path(name).read_bytes()))


@functools.cache
def original(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])


def original_embedding(name: str, ids: np.ndarray, output: str = "sentence_embedding") -> np.ndarray:
    ids = np.asarray(ids, np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return original(name).run([output], feeds)[0][0]


def assert_equal_to_original(embedder: Embedder, sentences, vectors, name=MODEL, output="sentence_embedding"):
    assert vectors.shape == (len(sentences), 64) and vectors.dtype == np.float32
    for request, got in zip(embedder.requests(sentences), vectors, strict=True):
        want = original_embedding(name, request["input_ids"], output)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.99999


@pytest.mark.parametrize("mode", list(PACK_ARGS))
def test_embed_equals_original_per_sentence(mode):
    embedder = Embedder(artifact(MODEL, mode), TOKENIZER)
    assert embedder.output == "sentence_embedding" and embedder.dimension == (64,) and embedder.max_length == 24
    vectors = embedder.embed(SENTENCES)
    assert_equal_to_original(embedder, SENTENCES, vectors)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)  # Normalize ran per sentence
    with embedder.online() as online:
        np.testing.assert_allclose(online.embed(SENTENCES[:5]), vectors[:5], atol=1e-6, rtol=0)


def test_requests_are_unpadded_and_truncated():
    embedder = Embedder(artifact(MODEL, "token_stream"), TOKENIZER)
    requests = embedder.requests(SENTENCES[:4])
    lengths = [len(r["input_ids"]) for r in requests]
    assert lengths[1] == 2 and lengths[3] == 24 and max(lengths) == 24  # [CLS] [SEP]; cut at 24, no padding to 32
    assert all(r["input_ids"][0] == 2 and r["input_ids"][-1] == 3 for r in requests)
    assert all(set(r) == {"input_ids", "token_type_ids"} and not r["token_type_ids"].any() for r in requests)


def test_max_length_from_a_sentence_transformers_folder_and_the_argument(tmp_path, caplog):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    assert load_tokenizer(folder)[1] == 12 and load_tokenizer(TOKENIZER)[1] == 24 and load_tokenizer(folder, 5)[1] == 5
    embedder = Embedder(artifact(MODEL, "token_stream"), folder)
    assert embedder.max_length == 12 and len(embedder.requests([SENTENCES[3]])[0]["input_ids"]) == 12
    with caplog.at_level(logging.WARNING, logger="poprt_lite.apps.embed"):
        capped = Embedder(artifact(MODEL, "token_stream"), folder, max_length=100)
    assert capped.max_length == 24
    assert caplog.messages == ["sentences are truncated at 24 tokens, the artifact's limit (segment_max_size); the tokenizer allows 100"]


def test_several_pooled_outputs_need_a_name():
    art = artifact("pooling_variants", "token_stream")
    with pytest.raises(PoprtError) as err:
        Embedder(art, TOKENIZER)
    assert str(err.value) == (
        f"'{model_path('pooling_variants')}' must have one pooled (per-request) output to embed with; it has several "
        "(cls_gather_sqrt_norm, cls_slice, mean_reducemean, mean_unmasked, max_where): pass output=NAME"
    )
    with pytest.raises(PoprtError, match=r"^output 'token_embeddings' of '.*' has layout 'stream', not one row per request; pooled outputs: cls_gather_sqrt_norm, "):
        Embedder(art, TOKENIZER, output="token_embeddings")
    embedder = Embedder(art, TOKENIZER, output="max_where")
    assert_equal_to_original(embedder, SENTENCES[:6], embedder.embed(SENTENCES[:6]), "pooling_variants", "max_where")


def test_embed_file_writes_one_row_per_line(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(SENTENCES[:6]) + "\n", encoding="utf-8")
    embedder = Embedder(artifact(MODEL, "attention_mask"), TOKENIZER)
    assert embedder.embed_file(lines, tmp_path / "out" / "vectors.npy") == 6
    vectors = np.load(tmp_path / "out" / "vectors.npy")
    assert_equal_to_original(embedder, SENTENCES[:6], vectors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vectors.npy"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: (d / "missing.txt", None), "input file '{d}/missing.txt' does not exist"),
        (lambda d: ((d / "bin.txt").write_bytes(b"ok\n\xff\xfe\n") and d / "bin.txt", None), "'{d}/bin.txt' is not UTF-8 text (invalid start byte at byte 3)"),
    ],
)
def test_embed_file_errors_leave_nothing_behind(tmp_path, setup, message):
    source, _ = setup(tmp_path)
    embedder = Embedder(artifact(MODEL, "token_stream"), TOKENIZER)
    with pytest.raises(PoprtError) as err:
        embedder.embed_file(source, tmp_path / "vectors.npy")
    assert str(err.value) == message.format(d=tmp_path)
    assert not (tmp_path / "vectors.npy").exists()


def test_bad_inputs():
    embedder = Embedder(artifact(MODEL, "token_stream"), TOKENIZER)
    with pytest.raises(PoprtError) as err:
        embedder.embed(["fine", 3])
    assert str(err.value) == "sentence 1 is a int, not a str"
    with pytest.raises(PoprtError) as err:
        Embedder(artifact(MODEL, "token_stream"), TESTDATA / "nothing.json")
    assert str(err.value) == f"tokenizer '{TESTDATA / 'nothing.json'}' does not exist; pass a tokenizer.json or the model folder holding it"
    assert embedder.embed([]).shape == (0, 64)


def test_unpacked_artifact_is_refused(tmp_path):
    model = compile(model_path(MODEL), save=False, options=CompileOptions()).model
    path = write_artifact(tmp_path / "plain.popef", model, converted_fields(model, b""))
    with pytest.raises(PoprtError) as err:
        Embedder(path, TOKENIZER)
    assert str(err.value) == f"'{path}' is not packed; compile it with pack_args (or use Embedder.from_model)"


def test_open_takes_an_exported_model_a_packed_model_or_an_artifact(tmp_path):
    exported = Embedder.open(model_path(MODEL), TOKENIZER)  # packed in memory: token_stream, segment_max_size 24
    assert exported.interface.mode.value == "token_stream" and exported.interface.segment_max_size == 24
    vectors = exported.embed(SENTENCES)
    assert_equal_to_original(exported, SENTENCES, vectors)
    packed = tmp_path / "packed.onnx"
    ir.save_model(artifact(MODEL, "attention_mask").model(), packed)
    np.testing.assert_allclose(Embedder.open(packed, TOKENIZER).embed(SENTENCES), vectors, atol=1e-5, rtol=0)
    with pytest.raises(PoprtError) as err:
        Embedder.open(packed, TOKENIZER, pack_args={"mode": "token_stream"})
    assert str(err.value) == "pack_args applies to an ONNX model that is not packed yet; this model is packed already"


# ------------------------------------------------------------- the user path, as sentence-transformers users expect


def test_one_str_gives_one_vector():
    """`SentenceTransformer.encode(str)` returns one vector, not one per character."""
    embedder = Embedder(artifact(MODEL, "token_stream"), TOKENIZER)
    vector = embedder.embed("hello world")
    assert vector.shape == (64,)
    np.testing.assert_array_equal(vector, embedder.embed(["hello world"])[0])
    with embedder.online() as online:
        online_vector = online.embed("hello world")
    assert online_vector.shape == (64,)
    np.testing.assert_allclose(online_vector, vector, atol=1e-6, rtol=0)
    with pytest.raises(PoprtError) as err:
        next(embedder.iter_embed("hello world"))
    assert str(err.value) == "iter_embed takes an iterable of sentences, not one str; embed(sentence) embeds one"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threads": -1}, "threads must be a whole number >= 0 (0: one per core), got -1"),
        ({"threads": 2.5}, "threads must be a whole number >= 0 (0: one per core), got 2.5"),
        ({"threads": True}, "threads must be a whole number >= 0 (0: one per core), got True"),
        ({"max_length": 0}, "max_length must be a whole number >= 1, got 0"),
        ({"max_length": -1}, "max_length must be a whole number >= 1, got -1"),
        ({"max_length": 2.5}, "max_length must be a whole number >= 1, got 2.5"),
    ],
)
def test_threads_and_max_length_are_checked(options, message):
    with pytest.raises(PoprtError) as err:
        Embedder.open(model_path(MODEL), TOKENIZER, **options)
    assert str(err.value) == message
    with pytest.raises(PoprtError) as err:
        Embedder(artifact(MODEL, "token_stream"), TOKENIZER, **options)
    assert str(err.value) == message


def test_a_notice_says_how_many_sentences_were_truncated(caplog):
    embedder = Embedder(artifact(MODEL, "token_stream"), TOKENIZER)  # SENTENCES[3] (76 tokens) and [5] (32) are cut at 24
    with caplog.at_level(logging.WARNING, logger="poprt_lite.apps.embed"):
        embedder.embed(SENTENCES[:3])
        assert caplog.messages == []
        embedder.embed(SENTENCES)
    assert caplog.messages == ["6 of 18 sentences were longer than 24 tokens and were truncated (max_length)"]
