"""The process around the app: SIGTERM drains (every call in flight answered, then exit 0), and a
model that cannot load ends the command with one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from apps.serve.server import EMBED_MODEL, ROOT, TOKENIZER, Server, cosine, free_port, reference_embedding, sigterm_with_calls_in_flight



def test_sigterm_answers_the_32_calls_in_flight_then_exits_0():
    # The runner waits 3 s for a batch to fill: the 32 calls are all in flight when SIGTERM comes.
    server = Server(EMBED_MODEL, "--tokenizer", TOKENIZER, "--timeout_microseconds", "3000000", "--graceful_shutdown_s", "10")
    texts = [f"in flight {i}" for i in range(32)]

    try:
        health, refused, answers = sigterm_with_calls_in_flight(server, texts, 30, normalize=False)
        code = server.process.wait(timeout=10)
    finally:
        server.stop()
    assert health.json() == {"error": "the server is shutting down", "error_type": "unhealthy"}
    assert refused.status_code == 503 and refused.json() == health.json()
    assert [a.status_code for a in answers] == [200] * 32
    for text, answer in zip(texts, answers, strict=True):
        assert cosine(np.asarray(answer.json()[0]), reference_embedding(text)) >= 0.99999
    assert code == 0, server.process.stdout.read()
    assert "SIGTERM: draining (32 calls in flight)" in server.process.stdout.read()


def test_a_model_that_cannot_load_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    run = subprocess.run(
        [sys.executable, "-m", "poprt_lite.cli", "serve", str(bad), "--tokenizer", str(TOKENIZER), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2
    assert run.stdout == "" and run.stderr.splitlines()[-1].startswith("error: ")
    assert "Traceback" not in run.stderr


def test_cli_refusals(capsys):
    from poprt_lite.cli.main import main

    assert main(["serve", str(EMBED_MODEL), "--max_concurrent_requests", "0"]) == 2
    assert capsys.readouterr().err == "error: --max_concurrent_requests must be >= 1, got 0\n"
    assert main(["serve", str(EMBED_MODEL), "--batcher", "bogus"]) == 2
    assert capsys.readouterr().err == "error: batcher must be one of packing, dynamic, single, got 'bogus'\n"
