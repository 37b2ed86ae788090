"""A real `poprt-lite serve` in a subprocess on a free port, and the original model to check it by."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[3]
TESTDATA = ROOT / "testdata"
EMBED_MODEL = TESTDATA / "st_mean_norm_torchscript.onnx"
TOKENIZER = TESTDATA / "tiny_tokenizer.json"  # 24 tokens at most (its own truncation)
QA_MODEL = TESTDATA / "bert_qa_torchscript.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m poprt_lite.cli serve ARGS` on a free port; `url`; `stop()` sends SIGTERM."""

    def __init__(self, *args: str, ready_s: float = 120.0, headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poprt_lite.cli", "serve", *map(str, args), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        deadline = time.monotonic() + ready_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}: {self.process.stdout.read()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.1)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples named `name` (every label set) on /metrics."""
        total = 0.0
        response = httpx.get(f"{self.url}/metrics", timeout=10, headers=self.headers)
        assert response.status_code == 200, response.text
        for line in response.text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@functools.cache
def original(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@functools.cache
def tokenizer(truncate: bool = True):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    if not truncate:
        tok.no_truncation()
    return tok


def reference_embedding(text: str) -> np.ndarray:
    """The unmodified model on this text's tokens alone, unpadded."""
    ids = np.asarray(tokenizer().encode(text).ids, np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return original(EMBED_MODEL).run(["sentence_embedding"], feeds)[0][0]


def reference_qa(ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    start, end = original(QA_MODEL).run(["start_logits", "end_logits"], feeds)
    return {"start_logits": start[0], "end_logits": end[0]}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def sigterm_with_calls_in_flight(server: Server, texts: list[str], timeout: float, **body) -> tuple:
    """Send one /embed call per text, wait until all are queued on the runner, SIGTERM the server,
    wait for /health to turn 503, and send one more call: (that /health, the late call's answer,
    the answers to `texts`). `body`: more fields of each call."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as http:
            calls = [asyncio.create_task(http.post("/embed", json={"inputs": t, **body})) for t in texts]
            for _ in range(1200):
                if server.metric("te_queue_size") == len(texts):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the {len(texts)} calls never all reached the runner")
            server.process.send_signal(signal.SIGTERM)
            for _ in range(3000):  # the drain has begun once /health says so
                health = await http.get("/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.01)
            refused = await http.post("/embed", json={"inputs": "too late"})
            return health, refused, await asyncio.gather(*calls)

    return asyncio.run(scenario())
