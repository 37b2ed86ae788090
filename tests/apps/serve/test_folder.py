"""`poprt-lite serve FOLDER`: a sentence-transformers folder on disk is served as `Embedder.open`
opens it (exported on first use into the cache, its tokenizer beside the export)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from apps.serve.server import TESTDATA, Server

pytest.importorskip("torch")  # the export of a folder needs '.[export]'
FOLDER = TESTDATA / "st_tiny_folder"
SENTENCES = ["hello world", "x", "of the tiny tokenizer and a few more words"]


def test_a_model_folder_is_served_like_embed_opens_it(tmp_path, monkeypatch):
    from poprt_lite.apps.embed import Embedder

    monkeypatch.setenv("POPRT_LITE_CACHE", str(tmp_path))  # the server's process inherits it
    want = Embedder.open(FOLDER).embed(SENTENCES)  # exports the folder into that cache
    with Server(FOLDER) as running:
        response = httpx.post(f"{running.url}/embed", json={"inputs": SENTENCES, "truncate": True}, timeout=60)
        assert response.status_code == 200, response.text
        info = httpx.get(f"{running.url}/info", timeout=10).json()
    got = np.asarray(response.json(), np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert info["model_id"] == "st_tiny_folder"
