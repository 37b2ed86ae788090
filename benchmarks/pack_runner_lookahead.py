"""PackRunner lookahead: batches and packing efficiency for the benchmark's 640 request lengths.

Replays the lengths of `poprt-lite bench` (clip(int32(Normal(128, 128)), 1, 256), numpy seed 2023)
through a PackRunner on testdata/bert_qa_torchscript.onnx compiled for AttentionMask packing
(16 x 256, max_valid_num 40, timeout 15000 µs), with 80 closed-loop clients, for several values of
`lookahead`. Every model run is stretched to `--batch_ms` so that, as with BERT-base, requests
arrive faster than batches run; packing does not depend on the model, only on when requests arrive.

Run from the repository root: python benchmarks/pack_runner_lookahead.py [--batch_ms 150]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from poprt_lite import runtime
from poprt_lite.bench.workload import synthetic_lengths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_runner_latency import compile_model, run_clients  # noqa: E402  (same geometry and clients)


class StretchedSession:
    """An onnxruntime session whose runs take at least `seconds`."""

    def __init__(self, session, seconds: float) -> None:
        self.session, self.seconds = session, seconds

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - start)))
        return out


def replay(path: Path, lengths: np.ndarray, lookahead: int, algorithm: str, clients: int, batch_s: float):
    config = runtime.PackRunnerConfig(timeout_microseconds=15000, lookahead=lookahead, algorithm=algorithm)
    config.enable_input_single_row_mode("attention_mask")
    with runtime.Runner(path, config) as runner:
        runner.session = StretchedSession(runner.session, batch_s)
        counter = itertools.count()

        def client() -> None:
            while (i := next(counter)) < len(lengths):
                runner.execute({"input_ids": np.full(int(lengths[i]), 5)})

        seconds = run_clients([client] * clients)
        return runner.stats, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--clients", type=int, default=80)
    parser.add_argument("--batch_ms", type=float, default=150.0)
    parser.add_argument("--lookahead", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 40])
    args = parser.parse_args()
    lengths, _ = synthetic_lengths(args.requests, 128, 256)
    print(f"{args.requests} requests, {int(lengths.sum())} tokens = {lengths.sum() / 4096:.2f} batches of 16 x 256")
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_model(Path(tmp), "attention_mask")
        print(f"{'algorithm':10s} {'lookahead':>9s} {'batches':>7s} {'by timeout':>10s} {'req/batch':>9s} {'efficiency':>10s} {'seconds':>7s}")
        for algorithm in ("first_fit", "next_fit"):
            for lookahead in args.lookahead:
                stats, seconds = replay(path, lengths, lookahead, algorithm, args.clients, args.batch_ms / 1e3)
                print(
                    f"{algorithm:10s} {lookahead:9d} {stats.batches:7d} {stats.batches_by_timeout:10d} "
                    f"{stats.mean_requests_per_batch:9.1f} {stats.packing_efficiency:10.1%} {seconds:7.1f}"
                )


if __name__ == "__main__":
    main()
