"""Attention at each request's own length: token_stream_loop against token_stream and the original model.

On a workload of `poprt-lite bench` (default: PopRT's BERT-base workload, `seed`), takes two kinds
of batches: offline, batches of the offline plan of the token_stream artifacts (`longest_first`:
requests of similar length together); online, batches of requests in arrival order (consecutive
requests of the workload up to max_tokens / max_valid_num, what a PackRunner packs from a queue).
Runs the same requests five ways, interleaved, `--rounds` times: the token_stream artifact (attention
on rows as long as each batch's longest request) on each batch in one call and as the calls of
similar lengths a PackRunner makes of it (`runtime.packing.length_groups`; offline batches are such
calls already), the token_stream_loop artifact (attention in a Loop
over the requests, each at its own length), the original model on each request alone (the best
dynamic mode of both kinds in `poprt-lite bench` on this workload) and in sorted batches of
batch_size padded to the longest. Prints wall and CPU time of this process (sessions without
spinning, as in the bench) for the whole set of requests, and each way's ratio to the original
each alone (the median of the per-round ratios, with their range). `--profile` adds onnxruntime's
node time by op type for each way.

Run from the repository root:
  python benchmarks/long_requests.py [--workload seed|queries] [--threads 2] [--rounds 5] [--batches 2] [--profile]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from poprt_lite.bench.measure import workload_context
from poprt_lite.bench.opcost import profile_by_op_type, time_interleaved
from poprt_lite.bench.packer import Batch, plan_dynamic
from poprt_lite.runtime.interface import read_packed_interface
from poprt_lite.runtime.packing import length_groups
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import PackMode

STREAM, LOOP = PackMode.token_stream, PackMode.token_stream_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="seed", choices=["seed", "queries"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="timed passes, interleaved (after one warm-up pass)")
    parser.add_argument("--batches", type=int, default=2, help="batches of each kind")
    parser.add_argument("--profile", action="store_true", help="also onnxruntime's node time by op type")
    args = parser.parse_args()
    ctx = workload_context(args.workload, (STREAM, LOOP))
    config, lengths = ctx.config, ctx.workload.lengths
    layout = read_packed_interface(ctx.artifacts[STREAM]).layout
    plan = ctx.plan(STREAM)
    picks = np.linspace(0, len(plan) - 1, args.batches).round().astype(int)
    kinds = {
        "offline (longest_first batches)": [plan[k].indices for k in picks],
        "online (arrival-order batches)": _arrival_batches(lengths, config.batch_size * config.max_seq_len, config.max_valid_num, args.batches),
    }
    threads = args.threads or os.cpu_count()
    print(f"workload {args.workload}: {config.geometry.tag}; {threads} intra-op threads; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.rounds} rounds after a warm-up")
    for kind, batches in kinds.items():
        _run(ctx, kind, batches, layout, threads, args)


def _arrival_batches(lengths: np.ndarray, max_tokens: int, max_valid_num: int, count: int) -> list[np.ndarray]:
    """The first `count` batches of requests taken in workload order, each up to max_tokens tokens
    and max_valid_num requests."""
    batches, current, tokens = [], [], 0
    for i, n in enumerate(lengths):
        if tokens + n > max_tokens or len(current) == max_valid_num:
            batches.append(np.asarray(current))
            current, tokens = [], 0
            if len(batches) == count:
                break
        current.append(i)
        tokens += int(n)
    return batches


def _run(ctx, kind: str, batches: list[np.ndarray], layout, threads: int, args) -> None:
    lengths = ctx.workload.lengths
    stream_batches = [Batch(idx, layout, layout.placement(lengths[idx])) for idx in batches]
    # what a PackRunner runs of each batch: its calls of similar lengths
    calls = [Batch(idx[g], layout, layout.placement(lengths[idx[g]])) for idx in batches for g in length_groups(lengths[idx])]
    dynamic = ctx.original_feeder(create_session(ctx.original))
    ways = {
        "token_stream, one call": (ctx.artifacts[STREAM].model_bytes, [ctx.artifact_feeder(STREAM).feeds(b) for b in stream_batches]),
        "token_stream, length groups": (ctx.artifacts[STREAM].model_bytes, [ctx.artifact_feeder(STREAM).feeds(b) for b in calls]),
        "token_stream_loop": (ctx.artifacts[LOOP].model_bytes, [ctx.artifact_feeder(LOOP).feeds(b) for b in stream_batches]),
        "original, each alone": (str(ctx.original), [dynamic.feeds(b) for idx in batches for b in _dynamic(lengths, idx, 1)]),
        f"original, sorted x{ctx.config.batch_size}": (
            str(ctx.original), [dynamic.feeds(b) for idx in batches for b in _dynamic(lengths, idx, ctx.config.batch_size)]),
    }
    count = sum(len(idx) for idx in batches)
    longest = [int(lengths[idx].max()) for idx in batches]
    own = sum(int((lengths[idx].astype(np.int64) ** 2).sum()) for idx in batches)
    rows = sum(len(idx) * m * m for idx, m in zip(batches, longest, strict=True))
    print(f"\n{kind}: {len(batches)} batches, {count} requests, {int(sum(lengths[idx].sum() for idx in batches))} tokens, "
          f"longest {longest}; attention pairs at own lengths / on longest rows: {own / rows:.2f}")
    wall, cpu = time_interleaved(ways, args.threads, args.rounds)
    base = "original, each alone"
    print(f"{'way':28s}{'wall ms median (min-max)':>28s}{'CPU ms median (min-max)':>28s}{'alone/way wall':>24s}{'alone/way CPU':>24s}")
    for name in ways:
        ratios = [_ratio(wall[base], wall[name]), _ratio(cpu[base], cpu[name])]
        print(f"{name:28s}" + "".join(f"{np.median(v):14.0f} ({min(v):5.0f}-{max(v):5.0f})" for v in (wall[name], cpu[name]))
              + "".join(f"{np.median(x):12.3f} ({min(x):.3f}-{max(x):.3f})" for x in ratios))
    if args.profile:
        results = {name: profile_by_op_type(model, feeds, args.threads, 1) for name, (model, feeds) in ways.items()}
        print(f"onnxruntime profile, node time by op type (ms, one pass after a warm-up)")
        ops = sorted({op for by_op in results.values() for op in by_op}, key=lambda op: -max(r.get(op, 0) for r in results.values()))
        print(f"{'op':24s}" + "".join(f"{name:>28s}" for name in ways))
        for op in ops[:14]:
            print(f"{op:24s}" + "".join(f"{results[name].get(op, 0.0):28.1f}" for name in ways))
        print(f"{'total':24s}" + "".join(f"{sum(results[name].values()):28.1f}" for name in ways))


def _ratio(base: list[float], way: list[float]) -> list[float]:
    return [b / w for b, w in zip(base, way, strict=True)]


def _dynamic(lengths: np.ndarray, indices: np.ndarray, batch_size: int) -> list[Batch]:
    """The original model's batches of the requests `indices`: sorted by length, `batch_size` per batch."""
    return [Batch(indices[p.indices], p.layout, p.placement) for p in plan_dynamic(lengths[indices], batch_size, sort=True)]


if __name__ == "__main__":
    main()
