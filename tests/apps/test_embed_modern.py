"""Text in, vectors out on a rotary, windowed encoder (issue 24): ModernBERT exported without a
position_ids input, mean-pooled; every sentence's vector equals the original model run alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TESTDATA, model_path
from poprt_lite.apps.embed import Embedder
from poprt_lite.cli.main import main

MODEL = "modernbert_rotary_torchscript"
TOKENIZER = TESTDATA / "tiny_tokenizer.json"
SENTENCES = ["hello world", "x", "a sentence long enough to cross the sixteen token window of the local layer for sure", "of the tiny tokenizer"] * 2
PACK_ARGS = {
    "token_stream": ({"mode": "token_stream", "max_valid_num": "8", "max_tokens": "64", "segment_max_size": "24"}, None),
    "attention_mask": ({"mode": "attention_mask", "max_valid_num": "8", "segment_max_size": "24"}, {"input_ids": (2, 32), "attention_mask": (2, 32)}),
    "unpack_repack": ({"mode": "unpack_repack", "max_valid_num": "8", "segment_max_size": "24"}, {"input_ids": (2, 32), "attention_mask": (2, 32)}),
}


def original(ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path(MODEL)), providers=["CPUExecutionProvider"])
    ids = np.asarray(ids, np.int64)[None]
    return session.run(["pooled"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]


@pytest.mark.parametrize("mode", list(PACK_ARGS))
def test_modernbert_embeddings_equal_the_original_alone(mode):
    pack_args, shape = PACK_ARGS[mode]
    embedder = Embedder.from_model(model_path(MODEL), TOKENIZER, pack_args=pack_args, input_shape=shape)
    vectors = embedder.embed(SENTENCES)
    requests = embedder.requests(SENTENCES)
    assert max(len(r["input_ids"]) for r in requests) == 24  # longer than the window: the band matters
    for request, got in zip(requests, vectors, strict=True):
        want = original(request["input_ids"])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.99999


def test_poprt_lite_embed_on_modernbert(tmp_path):
    """The CLI's text-in path: one vector per line of the input, equal to the original alone."""
    text = tmp_path / "in.txt"
    text.write_text("\n".join(SENTENCES[:4]) + "\n")
    out = tmp_path / "vectors.npy"
    assert main(["embed", str(model_path(MODEL)), "--tokenizer", str(TOKENIZER), "--input", str(text), "--output", str(out), "--quiet"]) == 0
    vectors = np.load(out)
    embedder = Embedder.from_model(model_path(MODEL), TOKENIZER)
    for request, got in zip(embedder.requests(SENTENCES[:4]), vectors, strict=True):
        np.testing.assert_allclose(got, original(request["input_ids"]), atol=1e-4, rtol=0)
