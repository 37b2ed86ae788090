"""A soak (slow): 64 clients for five minutes against the tiny model; the server's memory stays flat and
every call is answered. The 5-minute soak on the real MiniLM is `benchmarks/serve_bench.py --soak 300`."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from apps.serve.server import EMBED_MODEL, TOKENIZER, Server

SECONDS, EVERY = 300, 30  # the 5-minute soak


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.slow
def test_rss_stays_flat_under_five_minutes_of_64_clients():
    with Server(EMBED_MODEL, "--tokenizer", TOKENIZER, "--auto_truncate") as server:

        async def interval(seconds: float) -> tuple[int, int]:
            stop_at = time.monotonic() + seconds
            answered = failed = 0

            async def client(k: int) -> None:
                nonlocal answered, failed
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                    i = 0
                    while time.monotonic() < stop_at:
                        response = await http.post("/embed", json={"inputs": f"client {k} call {i} " + "word " * (i % 9)})
                        answered += response.status_code == 200
                        failed += response.status_code != 200
                        i += 1

            await asyncio.gather(*(client(k) for k in range(64)))
            return answered, failed

        samples = []
        for _ in range(SECONDS // EVERY):
            answered, failed = asyncio.run(interval(EVERY))
            assert failed == 0 and answered > 0
            samples.append(rss_mib(server.process.pid))
    # after the first interval (allocator pools, onnxruntime's arenas warm up) memory is flat
    assert max(samples[1:]) - samples[1] < 16, samples
