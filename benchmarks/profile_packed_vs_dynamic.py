"""Where a packed batch spends its time next to the original dynamic-shape model on the same requests.

Takes the requests of the first offline AttentionMask batch of a `poprt-lite bench` workload and runs
them five ways: packed (AttentionMask, 16 rows), as one token stream (token_stream artifact), and on
the original model each alone, sorted by length in batches of `batch_size` padded to the longest
(offline_dynamic_sorted), and in arrival order in such batches (what the online dynamic batcher
runs). First the ways run interleaved, `--rounds` passes over all the requests each, timed in wall
time and in this process's CPU time (sessions without spinning, as in the bench: CPU time is the
work done, and moves far less than wall time on a machine shared with other processes). Then
onnxruntime's own profiler sums the node times by op type (`--runs` passes after a warm-up). Every
number is milliseconds for the whole set of requests, so the columns compare directly.

Run from the repository root: python benchmarks/profile_packed_vs_dynamic.py [--workload seed|queries] [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from poprt_lite.bench.measure import workload_context
from poprt_lite.bench.opcost import profile_by_op_type, time_interleaved
from poprt_lite.bench.packer import Batch, plan_dynamic
from poprt_lite.runtime.interface import read_packed_interface
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import PackMode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="seed", choices=["seed", "queries"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3, help="profiled passes")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes, interleaved")
    args = parser.parse_args()
    ctx = workload_context(args.workload, (PackMode.attention_mask, PackMode.token_stream))
    config, original, artifacts = ctx.config, ctx.original, ctx.artifacts
    batch = ctx.plan(PackMode.attention_mask)[0]
    indices, lengths = batch.indices, ctx.workload.lengths[batch.indices]
    stream = read_packed_interface(artifacts[PackMode.token_stream]).layout
    stream_batch = Batch(indices, stream, stream.placement(lengths))
    source = create_session(original)
    dynamic = ctx.original_feeder(source)
    ways = {
        "AttentionMask (1 batch)": (artifacts[PackMode.attention_mask].model_bytes, [ctx.artifact_feeder(PackMode.attention_mask).feeds(batch)]),
        "token_stream (1 batch)": (artifacts[PackMode.token_stream].model_bytes, [ctx.artifact_feeder(PackMode.token_stream).feeds(stream_batch)]),
        "original, each alone": (str(original), [dynamic.feeds(b) for b in _dynamic_plans(ctx.workload.lengths, indices, 1)]),
        f"original, sorted x{config.batch_size}": (str(original), [dynamic.feeds(b) for b in _dynamic_plans(ctx.workload.lengths, indices, config.batch_size)]),
        f"original, arrival x{config.batch_size}": (str(original), [dynamic.feeds(b) for b in _dynamic_plans(ctx.workload.lengths, indices, config.batch_size, sort=False)]),
    }
    print(f"workload {args.workload}: {config.geometry.tag}; the {len(indices)} requests ({int(lengths.sum())} tokens) of the first "
          f"offline AttentionMask batch ({batch.placement.tokens / batch.slots:.1%} of its {batch.slots} slots); "
          f"{args.threads or os.cpu_count()} threads; ms for all of them")
    wall, cpu = time_interleaved(ways, args.threads, args.rounds)
    print(f"{'timed, median of ' + str(args.rounds):26s}" + "".join(f"{name:>26s}" for name in ways))
    for label, values in (("wall ms (min-max)", wall), ("CPU ms (min-max)", cpu)):
        print(f"{label:26s}" + "".join(f"{np.median(v):12.0f} ({min(v):5.0f}-{max(v):5.0f})" for v in values.values()))
    results = {name: profile_by_op_type(model, feeds, args.threads, args.runs) for name, (model, feeds) in ways.items()}
    print(f"\nonnxruntime profile, node time by op type, mean of {args.runs} passes")
    ops = sorted({op for by_op in results.values() for op in by_op}, key=lambda op: -max(r.get(op, 0) for r in results.values()))
    print(f"{'op':26s}" + "".join(f"{name:>26s}" for name in ways))
    for op in ops:
        print(f"{op:26s}" + "".join(f"{results[name].get(op, 0.0):26.1f}" for name in ways))
    print(f"{'total':26s}" + "".join(f"{sum(results[name].values()):26.1f}" for name in ways))


def _dynamic_plans(lengths: np.ndarray, indices: np.ndarray, batch_size: int, sort: bool = True) -> list[Batch]:
    """The original model's batches of the requests `indices` (sorted by length, or in order), as the bench plans them."""
    plans = plan_dynamic(lengths[indices], batch_size, sort=sort)
    return [Batch(indices[p.indices], p.layout, p.placement) for p in plans]


if __name__ == "__main__":
    main()
