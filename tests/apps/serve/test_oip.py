"""The README's BERT-QA artifact over the Open Inference Protocol, with the real `tritonclient.http`:
each row of an infer call is one packed request, equal to the original model on that row alone."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient

from apps.serve.server import QA_MODEL, ROOT, Server, reference_qa


@pytest.fixture(scope="module")
def qa_server(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    convert = [  # the README's one command
        sys.executable, "-m", "poprt_lite.cli", "--input_model", str(QA_MODEL), "--output_dir", str(out),
        "--input_shape", "input_ids=16,256", "attention_mask=16,256", "token_type_ids=16,256",
        "--pack_args", "max_valid_num=40", "segment_max_size=256", "mode=attention_mask", "--export_popef",
    ]
    subprocess.run(convert, check=True, cwd=ROOT, capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    with Server(out / "executable.popef", "--model_id", "bert_qa") as running:
        yield running


def padded_batch(rng, lengths, seq):
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, 1000, n)
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_rows_equal_the_original_alone(qa_server, binary):
    client = tritonclient.InferenceServerClient(url=qa_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("bert_qa")
    metadata = client.get_model_metadata("bert_qa")
    assert [o["name"] for o in metadata["outputs"]] == ["start_logits", "end_logits"]
    rng = np.random.default_rng(7)
    lengths = [5, 130, 1, 64, 256, 17]
    ids, mask = padded_batch(rng, lengths, 256)
    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        tensor = tritonclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [tritonclient.InferRequestedOutput(name, binary_data=binary) for name in ("start_logits", "end_logits")]
    result = client.infer("bert_qa", inputs, outputs=outputs)
    for name in ("start_logits", "end_logits"):
        got = result.as_numpy(name)
        assert got.shape == (6, 256) and got.dtype == np.float32
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(got[row, :n], reference_qa(ids[row, :n])[name], atol=1e-4, rtol=0)
            assert not got[row, n:].any()  # past a row's length: zeros
    plain = client.infer("bert_qa", inputs[:1])  # no mask: every row is whole; no outputs named: all, binary
    np.testing.assert_allclose(plain.as_numpy("end_logits")[2], reference_qa(ids[2])["end_logits"], atol=1e-4, rtol=0)


def test_v2_refusals(qa_server):
    unknown = httpx.post(f"{qa_server.url}/v2/models/other/infer", json={"inputs": []})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "model 'other' is not served here; this server serves 'bert_qa'", "error_type": "not_found"}
    too_long = {"inputs": [{"name": "input_ids", "shape": [1, 300], "datatype": "INT64", "data": [5] * 300}]}
    response = httpx.post(f"{qa_server.url}/v2/models/bert_qa/infer", json=too_long)
    assert response.status_code == 422
    assert response.json() == {"error": "the request has 300 tokens, more than segment_max_size 256 of the artifact; truncate or split it", "error_type": "validation"}
    holes = {"inputs": [
        {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [5, 6, 7]},
        {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 0, 1]},
    ]}
    response = httpx.post(f"{qa_server.url}/v2/models/bert_qa/infer", json=holes)
    assert response.status_code == 422
    assert response.json() == {"error": "row 0 of 'attention_mask' is not 1s then 0s; each row is one right-padded request", "error_type": "validation"}
    embed = httpx.post(f"{qa_server.url}/embed", json={"inputs": [[5, 6]]})
    assert embed.status_code == 422
    assert embed.json() == {"error": "/embed needs a sentence-embedding model (one pooled output); this model is a tensor model", "error_type": "validation"}
