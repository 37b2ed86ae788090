"""Empty rows: what a static batch costs when its requests fill only some of its rows, with the row
dim static (every row runs, PopRT's shape) and dynamic (`--dynamic_rows`: only the used rows run).

A static packed batch has B rows of S tokens. The last batch of an offline run, and on a lightly
loaded server every batch launched by its timeout, fills only some of them; with a static row dim
the empty rows cost as much as full ones. For a `poprt-lite bench` workload this script compiles the
padded, unpack/repack and AttentionMask artifacts twice (static rows, and `--dynamic_rows`, cached
like the bench's) and measures:

1. One batch whose requests (the workload's, packed in order) fill r of the B rows, for each r in
   `--rows`: the static artifact runs B rows, the dynamic one r. The two settings run interleaved,
   round after round (one model's two sessions at a time); median and range over the rounds, and the
   median of the per-round ratios.
2. The workload's last offline batch (best-fit-decreasing plan, as the bench's offline modes), the
   same way.
3. A PackRunner at low load, through `runtime.Runner(artifact, PackRunnerConfig(...))`:
   `--clients` closed-loop clients send `--requests` requests each, one at a time, so batches go by
   timeout with few rows; throughput, mean latency and rows per batch, static then dynamic.

Every output of the dynamic runs is compared with the static one (max |diff| printed; they compute
the same rows). Run from the repository root:
    python benchmarks/empty_rows.py [--workload seed|queries] [--rows 1,2,4,8,16] [--rounds 5] [--clients 1,4]
    python benchmarks/empty_rows.py --small --model testdata/bert_qa_torchscript.onnx   # seconds
"""

from __future__ import annotations

import argparse
import collections
import os
import threading
import time

import numpy as np

from poprt_lite.bench.config import BenchConfig, Progress
from poprt_lite.bench.export import cached_bert_qa, default_cache_dir
from poprt_lite.bench.models import kind_name, prepare_artifacts
from poprt_lite.bench.modes import Context
from poprt_lite.bench.packer import Batch, plan_packed
from poprt_lite.runtime import PackAlgorithm, PackRunnerConfig, Runner
from poprt_lite.runtime.interface import read_packed_interface
from poprt_lite.runtime.layouts import PaddedRows
from poprt_lite.runtime.modes import layout_for
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import PackMode

KINDS = (None, PackMode.unpack_repack, PackMode.attention_mask)  # the static ones
SETTINGS = ("static", "dynamic")


def batch_of_rows(ctx: Context, kind, rows: int, dynamic: bool) -> Batch:
    """The workload's requests packed in order (first_fit) into `rows` rows, laid out in the
    artifact's B rows (static) or only those (dynamic)."""
    c, lengths = ctx.config, ctx.workload.lengths
    if kind is None:
        indices = np.arange(rows)
        layout = PaddedRows(c.batch_size, c.max_seq_len, dynamic_rows=dynamic)
        return Batch(indices, layout, layout.placement(lengths[indices]))
    first = plan_packed(lengths, kind, rows, c.max_seq_len, c.max_valid_num, PackAlgorithm.first_fit)[0]
    layout = layout_for(kind, c.batch_size, c.max_seq_len, c.max_valid_num, dynamic)
    return Batch(first.indices, layout, first.placement)


def timed_rounds(cases: dict, rounds: int) -> dict:
    """cases: key -> (session, feeds); median ms per key over interleaved rounds (order alternating)."""
    for session, feeds in cases.values():
        session.run(None, feeds)  # warm-up
    times = collections.defaultdict(list)
    keys = list(cases)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else reversed(keys):
            session, feeds = cases[key]
            start = time.perf_counter()
            session.run(None, feeds)
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: np.array(v) for key, v in times.items()}


def max_diff(static_out, dynamic_out, batch: Batch, layouts) -> float:
    """The largest |difference| over the batch's real tokens between the two settings' outputs."""
    worst = 0.0
    for (a, b, layout) in zip(static_out, dynamic_out, layouts):
        got_a = batch.layout.gather(a, layout, batch.placement)
        got_b = batch.layout.gather(b, layout, batch.placement)
        worst = max(worst, float(np.abs(got_a - got_b).max()))
    return worst


def _dynamic_input(artifact) -> str:
    return read_packed_interface(artifact).dynamic_input


def low_load(artifact, ctx: Context, clients: int, requests: int) -> dict:
    """A PackRunner serving `clients` closed-loop clients, `requests` each, one request at a time."""
    c, w = ctx.config, ctx.workload
    config = PackRunnerConfig(timeout_microseconds=c.timeout_microseconds)
    runner = Runner(artifact, config, threads=c.threads)
    interface = runner.interface
    roles = {name: token.role for name, token in interface.token_inputs.items()}
    rows = []
    real = runner.session.run
    runner.session.run = lambda names, feeds: rows.append(feeds[interface.dynamic_input].shape[0]) or real(names, feeds)
    latencies = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(requests):
            i = (k * requests + j) % w.size
            start = time.perf_counter()
            runner.execute(w.request_feeds(i, roles))
            with lock:
                latencies.append(time.perf_counter() - start)

    runner.execute(w.request_feeds(0, roles))  # warm-up
    rows.clear()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    stats = runner.stats
    runner.close()
    return {
        "requests_per_s": clients * requests / seconds,
        "latency_ms": 1e3 * float(np.mean(latencies)),
        "batches": len(rows),
        "rows_per_batch": float(np.mean(rows)),
        "by_timeout": stats.batches_by_timeout - 1,  # the warm-up request went by timeout too
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="seed", choices=["seed", "queries"])
    parser.add_argument("--small", action="store_true", help="the bench's --small preset (a tiny model)")
    parser.add_argument("--model", help="an ONNX model instead of the exported one (e.g. testdata/bert_qa_torchscript.onnx)")
    parser.add_argument("--rows", default="1,2,4,8,16", help="rows a batch's requests fill (at most the batch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", default="1,4", help="closed-loop clients of the low-load PackRunner runs")
    parser.add_argument("--requests", type=int, default=8, help="requests per client in the low-load runs")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    args = parser.parse_args()
    config = BenchConfig.preset(args.workload, args.small, threads=args.threads, model=args.model)
    work = default_cache_dir()
    original = config.model or cached_bert_qa(work, config.geometry)
    common = dict(
        batch_size=config.batch_size, seq_len=config.max_seq_len, max_valid_num=config.max_valid_num,
        segment_max_size=config.max_seq_len, kinds=KINDS, on_step=lambda m: print(f"  {m}", flush=True),
    )
    artifacts = {
        setting: prepare_artifacts(original, work, dynamic_rows=setting == "dynamic", **common) for setting in SETTINGS
    }
    ctx = Context(config, original, artifacts["static"], Progress())
    B, S = config.batch_size, config.max_seq_len
    print(
        f"\nworkload {args.workload}{' (small)' if args.small else ''}: {config.geometry.tag}, batch {B}x{S}, "
        f"max_valid_num {config.max_valid_num}; {os.cpu_count()} CPUs, {config.n_threads} intra-op threads; "
        f"{args.rounds} interleaved rounds"
    )
    feeders = {s: Context(config, original, artifacts[s], Progress()) for s in SETTINGS}
    print(f"\n1. one batch filling r of its {B} rows: static runs {B} rows, dynamic r (ms per batch, median (min-max));")
    print("2. the workload's last offline batch (the bench's best-fit-decreasing plan)")
    print(f"{'model':16s} {'rows':>4s} {'static ms':>22s} {'dynamic ms':>22s} {'static/dynamic':>16s} {'max|diff|':>9s}")
    for kind in KINDS:  # two sessions at a time: BERT-base sessions are large
        sessions = {s: create_session(artifacts[s][kind].model_bytes, config.threads) for s in SETTINGS}
        layouts = [o.layout for o in read_packed_interface(artifacts["static"][kind]).outputs.values()] if kind else None
        last = ctx.plan(kind)[-1]
        cases = {}
        for rows in (int(r) for r in args.rows.split(",")):
            if rows <= B:
                cases[rows] = {s: batch_of_rows(ctx, kind, rows, s == "dynamic") for s in SETTINGS}
        cases["last"] = {
            s: Batch(last.indices, layout_for(kind, B, S, config.max_valid_num, s == "dynamic"), last.placement) for s in SETTINGS
        }
        for rows, batches in cases.items():
            feeds = {s: feeders[s].artifact_feeder(kind).feeds(batches[s]) for s in SETTINGS}
            times = timed_rounds({s: (sessions[s], feeds[s]) for s in SETTINGS}, args.rounds)
            outs = {s: sessions[s].run(None, feeds[s]) for s in SETTINGS}
            diff = max_diff(outs["static"], outs["dynamic"], batches["dynamic"], layouts or ["padded"] * len(outs["static"]))
            st, dy = times["static"], times["dynamic"]
            ratio = st / dy
            used = next(iter(feeds["dynamic"].values())).shape[0] if kind is None else feeds["dynamic"][_dynamic_input(artifacts["static"][kind])].shape[0]
            label = f"{rows}" if rows != "last" else f"last ({len(last)} requests, {used} rows)"
            print(
                f"{kind_name(kind):16s} {label:>4s} {np.median(st):10.1f} ({st.min():6.1f}-{st.max():6.1f}) "
                f"{np.median(dy):10.1f} ({dy.min():6.1f}-{dy.max():6.1f}) {np.median(ratio):7.2f}x ({ratio.min():.2f}-{ratio.max():.2f}) {diff:9.1e}",
                flush=True,
            )
        del sessions

    print("\n3. PackRunner at low load (timeout batches), static then dynamic")
    print(f"{'model':16s} {'clients':>7s} {'setting':>8s} {'req/s':>8s} {'latency ms':>11s} {'batches':>8s} {'rows/batch':>10s} {'by timeout':>10s}")
    for kind in KINDS[1:]:
        for clients in (int(k) for k in args.clients.split(",")):
            for s in SETTINGS:
                r = low_load(artifacts[s][kind], ctx, clients, args.requests)
                print(
                    f"{kind_name(kind):16s} {clients:7d} {s:>8s} {r['requests_per_s']:8.2f} {r['latency_ms']:11.1f} "
                    f"{r['batches']:8d} {r['rows_per_batch']:10.2f} {r['by_timeout']:10d}"
                )


if __name__ == "__main__":
    main()
