"""`poprt-lite serve --ray`: the serve app on Ray Serve replicas of a real 2-node cluster answers as the
single-process server does; a replica killed under load loses and crosses no call and comes back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from apps.serve.server import EMBED_MODEL, TOKENIZER, Server, cosine, reference_embedding, sigterm_with_calls_in_flight
from poprt_lite.cli.main import main

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

WORDS = "hello world of the tiny tokenizer a man eating food riding horse".split()
REPLICA = "SERVE_REPLICA::poprt-lite#poprt-lite#"  # how Serve names the app's replica actors (namespace serve)
CALLS = [  # (method, route, body): embeddings, token ids, tokenization, info, refusals
    ("POST", "/embed", {"inputs": ["hello world", "of the tiny tokenizer", "x"]}),
    ("POST", "/embed", {"inputs": "a sentence long enough to be cut at the tokenizer limit of twenty four tokens", "truncate": True}),
    ("POST", "/v1/embeddings", {"input": ["hello world", "tiny"], "model": "st_mean_norm_torchscript"}),
    ("POST", "/v1/embeddings", {"input": [[2, 40, 41, 3]], "model": "st_mean_norm_torchscript", "encoding_format": "float"}),
    ("POST", "/tokenize", {"inputs": ["hello world"]}),
    ("GET", "/info", None),
    ("GET", "/health", None),
    ("POST", "/embed", {"inputs": []}),
    ("POST", "/embed", {"inputs": "a sentence long enough to be cut at the tokenizer limit of twenty four tokens", "truncate": False}),
    ("POST", "/predict", {"inputs": "hello"}),
    ("POST", "/embed", {"nothing": 1}),
    ("GET", "/nowhere", None),
]


def ray_server(cluster, *args: str) -> Server:
    return Server(EMBED_MODEL, "--tokenizer", TOKENIZER, "--ray", cluster.address, *args, ready_s=600)


def call(url: str, method: str, route: str, body) -> httpx.Response:
    return httpx.request(method, url + route, json=body, timeout=60)


def assert_same_answer(got: httpx.Response, want: httpx.Response) -> None:
    assert got.status_code == want.status_code, (got.text, want.text)
    if got.headers.get("content-type", "").startswith("application/json"):
        np.testing.assert_equal(_rounded(got.json()), _rounded(want.json()))
    else:
        assert got.content == want.content


def _rounded(value):
    """JSON with floats rounded to 1e-5 (two runs of the same model differ in the last bits)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def replicas() -> list[str]:
    """The names of the application's live replica actors."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(REPLICA))


def nodes_of(cluster, names: list[str]) -> set[str]:
    """The nodes the named actors run on (the state API lags a little behind the actors)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while True:
        alive = list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
        found = {a.name: a.node_id for a in alive if a.name in names}
        if len(found) == len(names) or time.monotonic() > deadline:
            return set(found.values())
        time.sleep(1)


@pytest.mark.slow
def test_two_replicas_answer_as_the_single_process_server(cluster):
    with ray_server(cluster, "--replicas", "2") as on_ray, Server(EMBED_MODEL, "--tokenizer", TOKENIZER) as single:
        for method, route, body in CALLS:
            assert_same_answer(call(on_ray.url, method, route, body), call(single.url, method, route, body))
        answer = call(on_ray.url, "POST", "/embed", {"inputs": ["hello world", "of the tiny tokenizer"]}).json()
        for text, vector in zip(["hello world", "of the tiny tokenizer"], answer, strict=True):
            assert cosine(np.asarray(vector), reference_embedding(text)) >= 0.99999
        alive = replicas()
        assert len(alive) == 2 and len(nodes_of(cluster, alive)) == 2  # one replica per node
        assert on_ray.stop() == 0 and single.stop() == 0
    assert replicas() == []  # the application is gone with the command


@pytest.mark.slow
def test_a_replica_killed_under_load_crosses_and_loses_no_call(cluster):
    texts = [f"{a} {b}" for a in WORDS for b in WORDS]  # 144 texts of at most 18 tokens
    references = np.stack([reference_embedding(text) for text in texts])
    unit = references / np.linalg.norm(references, axis=1, keepdims=True)
    np.fill_diagonal(similar := unit @ unit.T, 0)
    assert similar.max() < 0.999  # a crossed answer could not pass for the right one
    answers: dict[str, list] = {}
    retried = []
    lock = threading.Lock()
    with ray_server(cluster, "--replicas", "2") as on_ray:
        def client(text: str) -> None:
            while True:  # a 5xx or a dropped connection is retried; anything else is an answer
                try:
                    response = httpx.post(f"{on_ray.url}/embed", json={"inputs": text}, timeout=60)
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code < 500:
                    break
                with lock:
                    retried.append(text)
                time.sleep(0.2)
            assert response.status_code == 200, response.text
            with lock:
                answers.setdefault(text, []).append(response.json()[0])

        with ThreadPoolExecutor(16) as clients:
            futures = [clients.submit(client, text) for text in texts]
            while len(answers) < 30 and not any(f.done() for f in futures):  # a client that stops early has failed
                time.sleep(0.05)
            (victim, _) = replicas()
            answered_at_kill = len(answers)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            for future in futures:
                future.result()
        assert answered_at_kill < len(texts) - 16  # the kill landed under load
        assert sorted(answers) == sorted(texts) and all(len(a) == 1 for a in answers.values())  # none lost, none twice
        for text, reference in zip(texts, references, strict=True):  # none crossed: each answer is its own text's
            assert cosine(np.asarray(answers[text][0]), reference) >= 0.99999
        deadline = time.monotonic() + 300
        while (len(replicas()) < 2 or victim in replicas()) and time.monotonic() < deadline:
            time.sleep(1)
        alive = replicas()
        assert len(alive) == 2 and victim not in alive  # Serve started a new replica in its place
        assert on_ray.stop() == 0


@pytest.mark.slow
def test_sigterm_drains_the_replicas_as_the_single_process_server_drains(cluster):
    """As tests/apps/serve/test_launcher.py: the runner waits 5 s for a batch to fill, so the calls
    are all in flight when SIGTERM comes; one replica, whose /metrics the proxy always reaches."""
    server = ray_server(cluster, "--replicas", "1", "--timeout_microseconds", "5000000", "--graceful_shutdown_s", "30")
    texts = [f"{a} {b}" for a, b in zip(WORDS, reversed(WORDS), strict=True)]

    try:
        health, refused, answers = sigterm_with_calls_in_flight(server, texts, 60)
        code = server.process.wait(timeout=120)
    finally:
        server.stop()
    assert health.json() == {"error": "the server is shutting down", "error_type": "unhealthy"}
    assert refused.status_code == 503 and refused.json() == health.json()
    assert [a.status_code for a in answers] == [200] * len(texts)
    for text, answer in zip(texts, answers, strict=True):
        assert cosine(np.asarray(answer.json()[0]), reference_embedding(text)) >= 0.99999
    assert code == 0
    assert "poprt-lite serve: draining 1 replicas" in server.process.stdout.read()
    assert replicas() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "2"], "--replicas applies with --ray; pass --ray auto|ADDRESS|local"),
        (["--ray", "local", "--batcher", "dynamic"], "--batcher dynamic runs in one process; on Ray each replica runs the artifact's PackRunner"),
        (["--ray", "local", "--replicas", "0"], "--replicas must be >= 1, got 0"),
        (["--ray", "local", "--replicas", "2", "--autoscaling_config", '{"max_replicas": 2}'], "--replicas and --autoscaling_config exclude each other; pass one"),
        (["--ray", "local", "--autoscaling_config", "[1]"],
         "--autoscaling_config must be a JSON object of Ray Serve's autoscaling fields, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'"),
        (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at '127.0.0.1:1' (Connection refused); check the head's address (`ray start` prints it on the head) or pass --ray local"),
    ],
)
def test_serving_on_ray_refuses_in_one_line(capsys, args, message):
    code = main(["serve", str(EMBED_MODEL), "--tokenizer", str(TOKENIZER), *args])
    stdout, err = capsys.readouterr()
    assert (code, stdout, err) == (2, "", f"error: {message}\n")


def test_a_shipped_server_takes_every_packing_option_the_cli_passes():
    """Without a cluster (the replica's side of the object store): what `serve --ray` ships, built with
    the CLI's packing options (here --precision int8), answers as the single-process engine does."""
    from poprt_lite.apps.ray.serve import ShippedServer
    from poprt_lite.apps.serve import Engine
    from poprt_lite.cli import options

    texts = ["hello world", "of the tiny tokenizer", "x"]
    packing = options.packing(None, None, "int8")
    shipped = ShippedServer.of(EMBED_MODEL, TOKENIZER, **packing)
    replica, single = shipped.engine(None, threads=1), Engine.open(EMBED_MODEL, TOKENIZER, threads=1, **packing)
    try:
        calls = [engine.submit_texts(texts, [engine.output], truncate=True) for engine in (replica, single)]
        for call in calls:
            call.done().result(30)
            assert call.error() is None
        np.testing.assert_array_equal(*(call.outputs_block(replica.output) for call in calls))
    finally:
        replica.close()
        single.close()
