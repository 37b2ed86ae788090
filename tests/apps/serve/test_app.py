"""`poprt-lite serve` over real HTTP: the official clients get the original model's answers, many
concurrent clients get their own, and every refusal has TEI's status and body.

The servers run as subprocesses (tests/apps/serve/server.py); answers are checked against the
unmodified model run by onnxruntime on each input alone, unpadded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import string
from concurrent.futures import Future

import httpx
import numpy as np
import pytest

from apps.serve.server import EMBED_MODEL, TOKENIZER, Server, cosine, original, reference_embedding, tokenizer



@pytest.fixture(scope="module")
def server():
    # --auto_truncate: the OpenAI route has no truncate field; long texts are cut as TEI's flag does
    with Server(EMBED_MODEL, "--tokenizer", TOKENIZER, "--auto_truncate") as running:
        yield running


@pytest.fixture(scope="module")
def limited():
    with Server(
        EMBED_MODEL, "--tokenizer", TOKENIZER, "--api_key", "sesame", "--payload_limit", "400",
        "--max_client_batch_size", "4", "--max_concurrent_requests", "2", "--timeout_microseconds", "600000000",
        "--pack_args", "mode=token_stream", "max_valid_num=2", "max_tokens=4096", "segment_max_size=24",
        headers={"Authorization": "Bearer sesame"},
    ) as running:
        yield running


TEXTS = ["hello world", "x", "Punctuation, CAPITALS and ümlauts!", "a text long enough to be cut at twenty four tokens for sure"]


def assert_original(texts, vectors, cos=0.99999):
    assert len(vectors) == len(texts)
    for text, got in zip(texts, vectors, strict=True):
        want = reference_embedding(text)
        assert cosine(np.asarray(got, np.float64), want) >= cos
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- the clients


def test_openai_client_gets_the_original_embeddings(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    answer = client.embeddings.create(input=TEXTS, model="any")  # the client asks for base64 and decodes it
    assert [d.index for d in answer.data] == [0, 1, 2, 3] and answer.model == "any"
    assert_original(TEXTS, [d.embedding for d in answer.data])
    tokens = sum(len(tokenizer().encode(t).ids) for t in TEXTS)
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (tokens, tokens)
    floats = client.embeddings.create(input="hello world", model="any", encoding_format="float")
    assert_original(["hello world"], [floats.data[0].embedding])
    ids = tokenizer().encode("hello world").ids
    by_ids = client.embeddings.create(input=[ids, ids[:3]], model="any", encoding_format="float")
    session_want = [reference_embedding("hello world")]
    np.testing.assert_allclose(by_ids.data[0].embedding, session_want[0], atol=1e-4, rtol=0)


def test_openai_dimensions_truncate_and_renormalize(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    got = np.asarray(client.embeddings.create(input="hello world", model="m", dimensions=16).data[0].embedding)
    want = reference_embedding("hello world")[:16]
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-4, rtol=0)


def test_huggingface_inference_client_feature_extraction(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    vectors = client.feature_extraction("Punctuation, CAPITALS and ümlauts!")
    assert vectors.shape == (1, 64)
    assert_original(["Punctuation, CAPITALS and ümlauts!"], vectors)


def test_tei_routes_and_headers(server):
    response = httpx.post(f"{server.url}/embed", json={"inputs": TEXTS, "normalize": False, "truncate": True})
    assert response.status_code == 200
    assert_original(TEXTS, response.json())
    tokens = sum(len(tokenizer().encode(t).ids) for t in TEXTS)
    assert response.headers["x-compute-tokens"] == str(tokens)
    assert response.headers["x-compute-characters"] == str(sum(len(t) for t in TEXTS))
    for name in ("x-compute-time", "x-queue-time", "x-inference-time", "x-tokenization-time"):
        assert int(response.headers[name]) >= 0
    all_tokens = httpx.post(f"{server.url}/embed_all", json={"inputs": "hello world"}).json()
    ids = np.asarray(tokenizer().encode("hello world").ids, np.int64)[None]
    want = original(EMBED_MODEL).run(["token_embeddings"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})[0][0]
    np.testing.assert_allclose(np.asarray(all_tokens[0]), want, atol=1e-4, rtol=0)
    tokens = httpx.post(f"{server.url}/tokenize", json={"inputs": "hi"}).json()
    cls, h, i, sep = tokenizer().encode("hi").ids
    assert tokens == [[
        {"id": cls, "text": "[CLS]", "special": True, "start": None, "stop": None},
        {"id": h, "text": "h", "special": False, "start": 0, "stop": 1},
        {"id": i, "text": "i", "special": False, "start": 1, "stop": 2},
        {"id": sep, "text": "[SEP]", "special": True, "start": None, "stop": None},
    ]]
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_type"] == {"embedding": {"output": "sentence_embedding"}} and info["max_input_length"] == 24
    assert info["batcher"] == "packing" and info["pack_mode"] == "token_stream"


# ------------------------------------------------------------------------------------ integrity


def unique_texts(clients: int, per_client: int) -> list[list[str]]:
    rng = random.Random(2023)
    letters = string.ascii_lowercase + "     "
    return [
        [f"{c}.{i} " + "".join(rng.choice(letters) for _ in range(rng.randint(0, 30))) for i in range(per_client)]
        for c in range(clients)
    ]


def test_64_concurrent_clients_get_their_own_answers(server):
    texts = unique_texts(64, 50)
    before = server.metric("te_request_success_total")

    async def client(mine: list[str]) -> list[tuple[str, int, list]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            out = []
            for text in mine:
                response = await http.post("/embed", json={"inputs": text, "truncate": True, "normalize": False})
                out.append((text, response.status_code, response.json()))
            return out

    async def everyone():
        return await asyncio.gather(*(client(mine) for mine in texts))

    answers = [a for per_client in asyncio.run(everyone()) for a in per_client]
    assert len(answers) == 64 * 50 and {status for _, status, _ in answers} == {200}
    flat = [t for mine in texts for t in mine]
    assert [text for text, _, _ in answers] == flat and len(set(flat)) == len(flat)
    worst = min(cosine(np.asarray(body[0], np.float64), reference_embedding(text)) for text, _, body in answers)
    assert worst >= 0.99999  # every answer is its own text's (a crossed answer would be another text's)
    assert server.metric("te_request_success_total") - before == 64 * 50
    assert server.metric("te_queue_size") == 0


# --------------------------------------------------------------------------------------- errors


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url, content=body if isinstance(body, (bytes, str)) else json.dumps(body), timeout=30, **kwargs)


@pytest.mark.parametrize("route, body, message", [
    ("/embed", {"inputs": []}, "`inputs` cannot be empty"),
    ("/embed", {"inputs": ""}, None),  # the empty text is [CLS] [SEP]: answered
    ("/embed", {"inputs": 5}, "`inputs` must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
    ("/embed", {"inputs": ["a", 5]}, "`inputs` must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
    ("/embed", {"text": "a"}, "`inputs` is missing"),
    ("/embed", b"{not json", "the request body is not valid JSON (Invalid JSON: key must be a string at line 1 column 2)"),
    ("/embed", {"inputs": "x" * 30, "truncate": False}, f"`inputs` must have less than 24 tokens. Given: {len(tokenizer(truncate=False).encode('x' * 30).ids)}"),
    ("/embed", {"inputs": [[5, 2000]]}, "feed 'input_ids' has ids >= the vocabulary size 1000"),
    ("/embed", {"inputs": "a", "truncation_direction": "up"}, "`truncation_direction`: Input should be 'left', 'right', 'Left' or 'Right'"),
    ("/predict", {"inputs": "a"}, "/predict needs a sequence classifier with several labels (a config.json beside the tokenizer with its id2label); this model is an embedding model"),
    ("/rerank", {"query": "a", "texts": ["b"]}, "/rerank needs a reranker (a sequence classifier with one label); this model is an embedding model"),
    ("/v1/embeddings", {"input": "a", "dimensions": 65}, "`dimensions` 65 > the model's embedding size 64"),
])
def test_422_validation(server, route, body, message):
    response = post(server.url + route, body)
    if message is None:
        assert response.status_code == 200
        return
    assert response.status_code == 422
    if route.startswith("/v1"):
        assert response.json() == {"message": message, "code": 422, "type": "validation"}
    else:
        assert response.json() == {"error": message, "error_type": "validation"}


def test_404_unknown_route(server):
    response = httpx.get(f"{server.url}/nowhere")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found: GET /nowhere", "error_type": "not_found"}


def test_401_without_the_api_key(limited):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{limited.url}/embed", json={"inputs": "a"}, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": "a valid API key is required: send the header 'Authorization: Bearer KEY'", "error_type": "unauthorized"}
    assert httpx.get(f"{limited.url}/health").status_code == 200  # probes need no key


KEY = {"Authorization": "Bearer sesame"}


def test_413_over_the_payload_limit(limited):
    body = json.dumps({"inputs": ["a" * 20] * 20})
    assert len(body) > 400
    response = httpx.post(f"{limited.url}/embed", content=body, headers=KEY)
    assert response.status_code == 413
    assert response.json() == {"error": "the request body is larger than the payload limit of 400 bytes", "error_type": "payload_limit"}

    def chunks():  # no content-length: counted as it streams in
        yield body[:200].encode()
        yield body[200:].encode()

    streamed = httpx.post(f"{limited.url}/embed", content=chunks(), headers=KEY)
    assert streamed.status_code == 413 and streamed.json() == response.json()


def test_422_too_many_inputs(limited):
    response = httpx.post(f"{limited.url}/embed", json={"inputs": ["a"] * 5}, headers=KEY)
    assert response.status_code == 422
    assert response.json() == {"error": "batch size 5 > maximum allowed batch size 4", "error_type": "validation"}


async def queued_in_runner(server, inputs: int = 1) -> None:
    """Wait (up to a minute) until `inputs` inputs wait in the server's runner."""
    for _ in range(1200):
        if server.metric("te_queue_size") == inputs:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{inputs} inputs never reached the runner")


def test_429_with_retry_after_while_the_limit_is_in_flight(limited):
    """Two inputs wait in the runner (its timeout is 10 minutes, its batches hold 2): a third is refused."""
    async def scenario():
        async with httpx.AsyncClient(base_url=limited.url, headers=KEY, timeout=60) as http:
            waiting = asyncio.create_task(http.post("/embed", json={"inputs": "one"}))
            await queued_in_runner(limited)  # "one" waits there
            refused = await http.post("/embed", json={"inputs": ["two", "three"]})
            fills = await http.post("/embed", json={"inputs": "two"})  # the batch is full: both run
            return refused, fills, await waiting

    refused, fills, first = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "Model is overloaded: 1 inputs in flight, the limit is 2", "error_type": "overloaded"}
    assert first.status_code == 200 and fills.status_code == 200
    assert_original(["one", "two"], [first.json()[0], fills.json()[0]])


def test_a_client_gone_while_its_input_waits_withdraws_it(limited):
    """A client disconnects while its input waits in the runner (batches of 2, a 10-minute timeout):
    the input leaves the runner and its place in flight is free at once, so the next call's two
    inputs are admitted (429 otherwise) and fill a batch of their own (else one would wait 10 minutes)."""
    async def scenario():
        async with httpx.AsyncClient(base_url=limited.url, headers=KEY, timeout=60) as http:
            gone_client = httpx.AsyncClient(base_url=limited.url, headers=KEY, timeout=60)
            gone = asyncio.create_task(gone_client.post("/embed", json={"inputs": "gone"}))
            await queued_in_runner(limited)  # "gone" waits there
            failures = limited.metric("te_request_failure_total")
            gone.cancel()
            await gone_client.aclose()  # its connection closes
            await queued_in_runner(limited, 0)
            both = await http.post("/embed", json={"inputs": ["three", "four"]})
            for _ in range(100):  # the gone call's answer, to no one, is counted as it is written
                if limited.metric("te_request_failure_total") > failures:
                    break
                await asyncio.sleep(0.05)
            return both, limited.metric("te_request_failure_total") - failures

    both, failures = asyncio.run(scenario())
    assert both.status_code == 200, both.text
    assert_original(["three", "four"], both.json())
    assert failures == 1  # counted as te_request_failure{err="client_closed"}


def test_503_while_the_model_loads():
    """The app itself (in process) before its engine exists: health and calls answer 503."""
    from fastapi.testclient import TestClient

    from poprt_lite.apps.serve import create_app

    loading: Future = Future()
    with TestClient(create_app(loading)) as client:
        for response in (client.get("/health"), client.post("/embed", json={"inputs": "a"})):
            assert response.status_code == 503
            assert response.json() == {"error": "the model is loading; retry shortly", "error_type": "unhealthy"}
        assert client.get("/v2/health/live").status_code == 200 and client.get("/v2/health/ready").status_code == 503
        loading.set_exception(RuntimeError("no such file"))
        assert client.get("/health").json() == {"error": "the model failed to load: RuntimeError: no such file", "error_type": "unhealthy"}


def test_base64_is_little_endian_float32(server):
    body = post(f"{server.url}/v1/embeddings", {"input": "x", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, reference_embedding("x"), atol=1e-4, rtol=0)
