"""PackRunner under concurrent clients: throughput and latency against timeout_microseconds.

Converts testdata/bert_qa_torchscript.onnx for AttentionMask packing (batch 16 x 256,
max_valid_num 40) and, for each number of client threads and each timeout, lets every client send
requests one at a time (`execute`) with lengths from clip(Normal(128, 128), 1, 256). Prints
throughput, average / P99 latency, requests per batch, packing efficiency and how batches were
launched (full / timeout).

Run from the repository root: python benchmarks/pack_runner_latency.py [--requests 20]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import poprt_lite
from poprt_lite import runtime

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, MAX_VALID = 16, 256, 40


def compile_model(workdir: Path, mode: str) -> Path:
    options = poprt_lite.CompileOptions(
        input_shape={n: (BATCH, SEQ) for n in ("input_ids", "attention_mask", "token_type_ids")},
        pack_args={"max_valid_num": str(MAX_VALID), "segment_max_size": str(SEQ), "mode": mode},
    )
    out = workdir / mode
    return poprt_lite.compile(ROOT / "testdata" / "bert_qa_torchscript.onnx", out / "model.onnx", output_dir=out,
                              export_popef=True, options=options).artifact


def run_clients(clients: list) -> float:
    """Run each callable in its own thread, all at once; return the wall time until all finish."""
    threads = [threading.Thread(target=client) for client in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def measure(path: Path, mode: str, clients: int, per_client: int, timeout_us: int) -> dict:
    config = runtime.PackRunnerConfig(timeout_microseconds=timeout_us)
    if mode == "attention_mask":
        config.enable_input_single_row_mode("attention_mask")
    latencies, lock = [], threading.Lock()
    with runtime.Runner(path, config) as runner:

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            mine = []
            for _ in range(per_client):
                n = int(np.clip(rng.normal(128, 128), 1, SEQ))
                feeds = {"input_ids": rng.integers(3, 1000, n), "token_type_ids": rng.integers(0, 2, n)}
                sent = time.perf_counter()
                runner.execute(feeds, {"start_logits": np.zeros(SEQ, np.float32)})
                mine.append(time.perf_counter() - sent)
            with lock:
                latencies.extend(mine)

        elapsed = run_clients([lambda k=k: client(k) for k in range(clients)])
        stats = runner.stats
    times = np.sort(latencies)
    return {
        "throughput": len(times) / elapsed,
        "avg_ms": 1e3 * times.mean(),
        "p99_ms": 1e3 * times[int(len(times) * 0.99)],
        "stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 56])
    parser.add_argument("--timeouts", type=int, nargs="+", default=[0, 2000, 15000], help="microseconds")
    parser.add_argument("--mode", choices=("attention_mask", "unpack_repack"), default="attention_mask")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_model(Path(tmp), args.mode)
        print(f"{args.mode}, batch {BATCH}x{SEQ}, max_valid_num {MAX_VALID}, {args.requests} requests per client")
        print(f"{'clients':>7} {'timeout us':>10} {'samples/s':>10} {'avg ms':>8} {'p99 ms':>8} "
              f"{'req/batch':>9} {'efficiency':>10} {'full':>5} {'timeout':>7}")
        for clients in args.clients:
            for timeout in args.timeouts:
                r = measure(path, args.mode, clients, args.requests, timeout)
                s = r["stats"]
                print(f"{clients:>7} {timeout:>10} {r['throughput']:>10.1f} {r['avg_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                      f"{s.mean_requests_per_batch:>9.2f} {s.packing_efficiency:>10.1%} "
                      f"{s.batches_by_fullness:>5} {s.batches_by_timeout:>7}")


if __name__ == "__main__":
    main()
