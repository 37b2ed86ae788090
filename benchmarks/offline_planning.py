"""Offline planning for a packed artifact: the same workload planned by each offline algorithm.

A token_stream artifact runs attention on rows as long as its batch's longest request, so what a
batch costs depends on which requests the planner puts together, not only on how many tokens it
holds. For a `poprt-lite bench` workload this script plans the whole dataset for one pack mode with
each algorithm of `--algorithms` (`runtime.offline.plan_batches`, what `ModelRunner.run_requests`
and the bench's offline modes use) and runs every plan through its own session of the same
artifact, batch after batch, the plans interleaved (the shorter plans' batches spread evenly over
the longer ones) so all see the same machine. It prints per plan: batches, the attention work of
token_stream's rows (sum over batches of requests x longest request^2, relative to the first plan),
wall and CPU time for the whole workload, and requests/s. Sessions run without spinning, as the
bench's; CPU time is this process's (work done: on a shared machine it moves far less than wall).

Run from the repository root (the bench's models, exported and compiled on first use):
    python benchmarks/offline_planning.py [--workload queries|seed] [--mode token_stream] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from poprt_lite.bench.measure import workload_context
from poprt_lite.bench.monitor import own_cpu
from poprt_lite.bench.packer import plan_packed
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import PackMode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="queries", choices=["seed", "queries"])
    parser.add_argument("--mode", default=PackMode.token_stream.value, choices=[m.value for m in PackMode])
    parser.add_argument("--algorithms", default="best_fit_decreasing,longest_first")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    mode = PackMode(args.mode)
    ctx = workload_context(args.workload, (mode,))
    c, lengths = ctx.config, ctx.workload.lengths
    artifact, feeder = ctx.artifacts[mode], ctx.artifact_feeder(mode)
    plans = {
        name: plan_packed(lengths, mode, c.batch_size, c.max_seq_len, c.max_valid_num, name)
        for name in args.algorithms.split(",")
    }
    feeds = {name: [feeder.feeds(batch) for batch in plan] for name, plan in plans.items()}
    sessions = {name: create_session(artifact.model_bytes, args.threads, spinning=False) for name in plans}
    for name, session in sessions.items():  # warm-up
        session.run(None, feeds[name][0])
    wall = dict.fromkeys(plans, 0.0)
    cpu = dict.fromkeys(plans, 0.0)
    steps = max(len(f) for f in feeds.values())
    for step in range(steps):
        for name, batches in feeds.items():
            for batch in batches[step * len(batches) // steps : (step + 1) * len(batches) // steps]:
                cpu0, start = own_cpu(), time.perf_counter()
                sessions[name].run(None, batch)
                wall[name] += time.perf_counter() - start
                cpu[name] += own_cpu() - cpu0
    work = {name: sum(len(b.indices) * int(b.placement.lengths.max()) ** 2 for b in plan) for name, plan in plans.items()}
    first = next(iter(plans))
    print(f"workload {args.workload}: {len(lengths)} requests, {c.geometry.tag}; {mode.value} artifact; "
          f"{args.threads or 'all'} threads; whole workload per plan, plans interleaved")
    print(f"{'algorithm':22s} {'batches':>8s} {'attention work':>15s} {'wall s':>8s} {'CPU s':>8s} {'requests/s':>11s} {'CPU vs ' + first:>24s}")
    for name in plans:
        print(f"{name:22s} {len(plans[name]):8d} {work[name] / work[first]:14.2f}x {wall[name]:8.2f} {cpu[name]:8.2f} "
              f"{len(lengths) / wall[name]:11.1f} {cpu[first] / cpu[name]:23.3f}x")


if __name__ == "__main__":
    main()
