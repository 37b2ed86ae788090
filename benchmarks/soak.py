"""Load and soak test of the PackRunner: many client threads, every answer checked, bounded in time.

For each mode (unpack_repack; attention_mask with first_fit; token_stream, whose batches hold at most
batch x seq tokens) it converts testdata/bert_qa_torchscript.onnx (batch 16 x 128, max_valid_num 40,
segment_max_size 128 by default) and runs three phases on fresh PackRunners:

1. soak: `--clients` threads send `--requests` requests of random lengths 1..segment_max_size
   through one online PackRunner, half of them with `execute`, half with `execute_async(...).wait`,
   each into its own reused output arrays. Every response is compared with the original model run
   on that request alone (computed up front, grouped by length into [k, n] batches: no padding, so
   exact). Midway, one batch is made to fail (the session's `run` raises once): exactly that
   batch's requests must fail, with the batch's error, and the next batch must succeed.
   Reported: requests/s, P50/P99/max latency, batches by fullness / timeout, lost, mismatched and
   failed requests, hung threads, RSS before, after warm-up and at the end.
2. close under load, draining: while the clients send, `close()`; it returns once the pending
   requests have run (reported in batch times).
3. close under load, `cancel_pending=True`: returns within the batch being run.

Every number that must hold is checked; the exit status is 0 only if all checks pass. Bounded:
each phase stops sending at `--time-limit` seconds, and threads are joined with a timeout.

Run from the repository root: python benchmarks/soak.py [--requests 20000 --clients 64]
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

import poprt_lite
from poprt_lite import runtime
from poprt_lite.runtime import modes
from poprt_lite.runtime.pack_runner import CANCELLED
from poprt_lite.errors import PoprtError
from poprt_lite.vocab import PackMode

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "testdata" / "bert_qa_torchscript.onnx"
OUTPUTS = ("start_logits", "end_logits")
VOCAB = 1000
TOLERANCE = 1e-4  # max |packed - original| per logit (fp32; observed ~1e-6)
INJECTED = "injected failure (soak test)"
MODES = tuple((mode.value, runtime.PackAlgorithm.first_fit) for mode in PackMode)
STREAMS = tuple(m.name for m in modes.registered() if not m.one_row)  # requests one after another, lengths in unpack_info


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------ workload, reference


@dataclass
class Workload:
    ids: list[np.ndarray]
    types: list[np.ndarray]
    reference: list[dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.ids)


def make_workload(requests: int, max_len: int, seed: int, chunk: int = 64) -> Workload:
    """Random requests (lengths uniform in 1..max_len) and the original model's answer to each,
    computed by length: all requests of length n run as [k, n] batches, which involve no padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, requests)
    ids = [rng.integers(3, VOCAB, n) for n in lengths]
    types = [(np.arange(n) >= rng.integers(0, n + 1)).astype(np.int64) for n in lengths]  # question | context
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    reference: list[dict[str, np.ndarray] | None] = [None] * requests
    by_length = collections.defaultdict(list)
    for i, n in enumerate(lengths.tolist()):
        by_length[n].append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            batch_ids = np.stack([ids[i] for i in part])
            feeds = {"input_ids": batch_ids, "attention_mask": np.ones_like(batch_ids),
                     "token_type_ids": np.stack([types[i] for i in part])}
            outs = session.run(list(OUTPUTS), feeds)
            for row, i in enumerate(part):
                reference[i] = {name: out[row].copy() for name, out in zip(OUTPUTS, outs)}
    return Workload(ids, types, reference)


def compile_artifact(workdir: Path, mode: str, batch: int, seq: int, max_valid_num: int, segment_max_size: int) -> Path:
    pack_args = {"max_valid_num": str(max_valid_num), "segment_max_size": str(segment_max_size), "mode": mode}
    if not modes.get(mode).static:  # a token stream: a batch holds up to batch x seq tokens
        shape, pack_args["max_tokens"] = {}, str(batch * seq)
    else:
        shape = {n: (batch, seq) for n in ("input_ids", "attention_mask", "token_type_ids")}
    options = poprt_lite.CompileOptions(input_shape=shape, pack_args=pack_args)
    out = workdir / mode
    return poprt_lite.compile(MODEL, out / "model.onnx", output_dir=out, export_popef=True, options=options).artifact


def make_config(mode: str, algorithm, timeout_us: int) -> runtime.PackRunnerConfig:
    config = runtime.PackRunnerConfig(timeout_microseconds=timeout_us)
    config.algorithm = algorithm
    if mode == "attention_mask":
        config.enable_input_single_row_mode("attention_mask")
    return config


# ----------------------------------------------------------------------------------- instrumentation


class Session:
    """Wraps the runner's `session.run`: times every batch, records the requests (their token ids)
    of each batch, and can make one batch fail."""

    def __init__(self, runner, mode: str) -> None:
        self.mode, self.real = mode, runner.session.run  # no reference to the runner: no cycle
        self.lock = threading.Lock()
        self.times: list[float] = []  # (session.run seconds) per batch
        self.starts: list[float] = []  # monotonic start of each batch
        self.fail_when = None  # a callable; the first batch run while it is true fails
        self.failed_batch: collections.Counter | None = None  # token-id tuples of the failed batch
        self.failed_call = -1
        self.next_batch_ok: bool | None = None
        runner.session.run = self

    def segments(self, feeds) -> collections.Counter:
        ids = feeds["input_ids"]
        if self.mode in STREAMS:
            flat, lengths = ids.reshape(-1), feeds["unpack_info"][feeds["unpack_info"] > 0]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            return collections.Counter(tuple(flat[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:]))
        mask = feeds["attention_mask"]
        return collections.Counter(
            tuple(ids[row][mask[row] == s].tolist()) for row in range(len(ids)) for s in np.unique(mask[row]) if s > 0
        )

    def __call__(self, names, feeds):
        with self.lock:
            call = len(self.starts)
            self.starts.append(time.monotonic())
            fail = self.failed_batch is None and self.fail_when is not None and self.fail_when()
            if fail:
                self.failed_batch, self.failed_call = self.segments(feeds), call
        if fail:
            self.times.append(0.0)
            raise RuntimeError(INJECTED)
        start = time.perf_counter()
        try:
            result = self.real(names, feeds)
        except BaseException:
            if call == self.failed_call + 1:
                self.next_batch_ok = False
            raise
        self.times.append(time.perf_counter() - start)
        if self.failed_call >= 0 and call == self.failed_call + 1:
            self.next_batch_ok = True
        return result

    def batch_ms(self) -> tuple[float, float]:
        times = [t for t in self.times if t > 0]
        return (1e3 * float(np.median(times)), 1e3 * float(np.max(times))) if times else (float("nan"),) * 2


@dataclass
class Tally:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    mismatched: int = 0
    failed: list[int] = field(default_factory=list)  # request indices whose call or future failed
    errors: collections.Counter = field(default_factory=collections.Counter)  # error message -> count
    refused: int = 0  # calls refused because the runner was closed
    worst: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def merge(self, other: Tally) -> None:
        with self.lock:
            self.latencies += other.latencies
            self.ok += other.ok
            self.mismatched += other.mismatched
            self.failed += other.failed
            self.errors.update(other.errors)
            self.refused += other.refused
            self.worst = max(self.worst, other.worst)


def client(runner, workload: Workload, indices, use_async: bool, deadline: float, tally: Tally,
           progress: list[int], until_closed: bool = False) -> None:
    """Send the requests `indices` one at a time (cycling while `until_closed`), check every answer."""
    mine = Tally()
    n_max = runner.segment_max_size
    outputs = {name: np.zeros(n_max, np.float32) for name in OUTPUTS}  # reused: one request in flight
    k = 0
    try:
        while k < len(indices) or until_closed:
            if time.monotonic() > deadline:
                break
            i = indices[k % len(indices)]
            k += 1
            feeds = {"input_ids": workload.ids[i], "token_type_ids": workload.types[i]}
            sent = time.perf_counter()
            try:
                if use_async:
                    runner.execute_async(feeds, outputs).wait(timeout=120)
                else:
                    runner.execute(feeds, outputs)
            except PoprtError as exc:
                if "is closed" in str(exc):
                    mine.refused += 1
                    break
                mine.failed.append(i)
                mine.errors[str(exc)] += 1
                continue
            mine.latencies.append(time.perf_counter() - sent)
            n = len(workload.ids[i])
            diff = max(float(np.abs(outputs[name][:n] - workload.reference[i][name]).max()) for name in OUTPUTS)
            if not diff <= TOLERANCE:  # NaN counts as a mismatch
                mine.mismatched += 1
            else:
                mine.ok += 1
            mine.worst = max(mine.worst, diff) if diff == diff else float("inf")
            progress[0] += 1  # benign race: only used to decide when "midway" is
    finally:
        tally.merge(mine)


def start_clients(runner, workload, indices_per_client, deadline, tally, progress, until_closed=False):
    threads = [
        threading.Thread(target=client, args=(runner, workload, idx, c % 2 == 1, deadline, tally, progress, until_closed),
                         name=f"soak-client-{c}", daemon=True)
        for c, idx in enumerate(indices_per_client)
    ]
    for t in threads:
        t.start()
    return threads


def join_all(threads, timeout: float) -> int:
    """Join with one overall timeout; return the number of threads still alive (hung)."""
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return sum(t.is_alive() for t in threads)


# ------------------------------------------------------------------------------------------ phases


def soak(path, mode, algorithm, workload, clients, timeout_us, time_limit, inject=True) -> dict:
    gc.collect()
    rss_start = rss_mb()
    runner = runtime.Runner(path, make_config(mode, algorithm, timeout_us))
    session = Session(runner, mode)
    requests = len(workload)
    progress, tally = [0], Tally()
    warm = min(requests // 10, 2000)
    rss_warm = [None]
    if inject:
        session.fail_when = lambda: progress[0] >= requests // 2
    sampler_stop = threading.Event()
    peak = [rss_start]

    def sample() -> None:
        while not sampler_stop.wait(0.2):
            peak[0] = max(peak[0], rss_mb())
            if rss_warm[0] is None and progress[0] >= warm:
                rss_warm[0] = rss_mb()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    indices = [list(range(c, requests, clients)) for c in range(clients)]
    start = time.perf_counter()
    threads = start_clients(runner, workload, indices, time.monotonic() + time_limit, tally, progress)
    hung = join_all(threads, time_limit + 120)
    elapsed = time.perf_counter() - start
    stats = runner.stats
    runner.close(timeout=30)
    sampler_stop.set()
    sampler.join()
    rss_end = rss_mb()
    answered = tally.ok + tally.mismatched + len(tally.failed)
    failed_batch = session.failed_batch or collections.Counter()
    failed_requests = collections.Counter(tuple(workload.ids[i].tolist()) for i in tally.failed)
    lat = np.sort(np.asarray(tally.latencies)) * 1e3
    report = {
        "mode": f"{mode} ({algorithm.value})",
        "requests": requests,
        "sent_all": sum(len(x) for x in indices) == requests and not hung and answered == requests,
        "elapsed_s": elapsed,
        "requests_per_s": answered / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max_ms": float(lat[-1]) if len(lat) else float("nan"),
        "batch_ms": session.batch_ms(),
        "stats": stats,
        "ok": tally.ok,
        "lost": requests - answered,
        "mismatched": tally.mismatched,
        "worst_diff": tally.worst,
        "failed": len(tally.failed),
        "errors": dict(tally.errors),
        "hung": hung,
        "serving_thread_alive": runner._thread.is_alive(),
        "injected": inject,
        "failed_batch_size": sum(failed_batch.values()),
        "failed_exactly_that_batch": failed_requests == failed_batch,
        "next_batch_ok": session.next_batch_ok,
        "rss_mb": (rss_start, rss_warm[0] if rss_warm[0] is not None else float("nan"), peak[0], rss_end),
    }
    return report


def close_under_load(path, mode, algorithm, workload, clients, timeout_us, cancel: bool, warm_s: float = 1.0) -> dict:
    """Clients send continuously; after `warm_s`, close() (draining, or cancelling what is pending)."""
    runner = runtime.Runner(path, make_config(mode, algorithm, timeout_us))
    session = Session(runner, mode)
    progress, tally = [0], Tally()
    indices = [list(range(c, len(workload), clients)) for c in range(clients)]
    threads = start_clients(runner, workload, indices, time.monotonic() + 60 + warm_s, tally, progress, until_closed=True)
    time.sleep(warm_s)
    with runner._cond:
        pending = len(runner._open) + len(runner._waiting)
    started = time.monotonic()
    runner.close(cancel_pending=cancel, timeout=60)
    close_s = time.monotonic() - started
    hung = join_all(threads, 30)
    after = sum(1 for s in session.starts if s >= started)  # batches started after close() was called
    median_ms, max_ms = session.batch_ms()
    stats = runner.stats
    return {
        "mode": f"{mode} ({algorithm.value})",
        "cancel_pending": cancel,
        "pending_at_close": pending,
        "close_ms": 1e3 * close_s,
        "batches_after_close": after,
        "batch_ms": (median_ms, max_ms),
        "hung": hung,
        "serving_thread_alive": runner._thread.is_alive(),
        "ok": tally.ok,
        "mismatched": tally.mismatched,
        "cancelled": sum(c for e, c in tally.errors.items() if CANCELLED in e),
        "other_errors": {e: c for e, c in tally.errors.items() if CANCELLED not in e},
        "refused_after_close": tally.refused,
        "stats": stats,
    }


# ------------------------------------------------------------------------------------------- report


def check_soak(r: dict, rss_growth_mb: float) -> list[str]:
    problems = []
    if not r["sent_all"]:
        problems.append("not every request was sent and answered (time limit or hung client)")
    for key in ("lost", "mismatched", "hung"):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    if r["serving_thread_alive"]:
        problems.append("serving thread still alive after close()")
    if r["injected"]:
        if r["stats"].failed_batches != 1 or r["failed"] != r["failed_batch_size"] or not r["failed_exactly_that_batch"]:
            problems.append("the injected failure did not fail exactly its own batch")
        if set(r["errors"]) != {f"the batch of {r['failed_batch_size']} requests holding this request failed: RuntimeError: {INJECTED}"}:
            problems.append(f"unexpected errors: {r['errors']}")
        if r["next_batch_ok"] is not True:
            problems.append("the batch after the injected failure did not succeed")
    elif r["failed"]:
        problems.append(f"failed requests: {r['errors']}")
    _, warm, _, end = r["rss_mb"]
    if end - warm > rss_growth_mb:
        problems.append(f"RSS grew by {end - warm:.0f} MB after warm-up (limit {rss_growth_mb:.0f} MB)")
    return problems


def check_close(r: dict, slack_ms: float) -> list[str]:
    problems = []
    _, max_ms = r["batch_ms"]
    # cancel: only the batch being run is waited for; drain: that one plus the pending ones
    allowed = (1 if r["cancel_pending"] else 1 + r["batches_after_close"]) * max_ms + slack_ms
    if not r["close_ms"] <= allowed:
        problems.append(f"close() took {r['close_ms']:.0f} ms, more than {allowed:.0f} ms")
    if r["cancel_pending"] and r["batches_after_close"] > 1:
        problems.append(f"close(cancel_pending=True) still launched {r['batches_after_close']} batches")
    if r["hung"] or r["serving_thread_alive"]:
        problems.append(f"hung client threads: {r['hung']}, serving thread alive: {r['serving_thread_alive']}")
    if r["mismatched"] or r["other_errors"]:
        problems.append(f"mismatched {r['mismatched']}, errors {r['other_errors']}")
    if not r["cancel_pending"] and r["cancelled"]:
        problems.append(f"close() without cancel_pending failed {r['cancelled']} requests")
    return problems


def format_soak(r: dict) -> str:
    s = r["stats"]
    rss = r["rss_mb"]
    return "\n".join([
        f"[soak: {r['mode']}]",
        f"  {r['requests']} requests from the clients in {r['elapsed_s']:.1f} s: {r['requests_per_s']:.0f} requests/s",
        f"  latency P50 {r['p50_ms']:.1f} ms, P99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms; "
        f"batch (session.run) median {r['batch_ms'][0]:.1f} ms, max {r['batch_ms'][1]:.1f} ms",
        f"  batches {s.batches}: {s.batches_by_fullness} by fullness, {s.batches_by_timeout} by timeout, "
        f"{s.batches_by_close} on close, {s.failed_batches} failed; {s.mean_requests_per_batch:.1f} requests/batch, "
        f"packing efficiency {s.packing_efficiency:.1%}",
        f"  answers: {r['ok']} correct (max |diff| {r['worst_diff']:.1e}), lost {r['lost']}, mismatched {r['mismatched']}, "
        f"failed {r['failed']}, hung threads {r['hung']}",
        (f"  injected failure: 1 batch of {r['failed_batch_size']} requests failed; failed requests == that batch: "
         f"{r['failed_exactly_that_batch']}; next batch succeeded: {r['next_batch_ok']}") if r["injected"] else "  no failure injected",
        f"  RSS: {rss[0]:.0f} MB before, {rss[1]:.0f} MB after warm-up, {rss[2]:.0f} MB peak, {rss[3]:.0f} MB at the end "
        f"(growth after warm-up {rss[3] - rss[1]:+.0f} MB)",
    ])


def format_close(r: dict) -> str:
    median_ms, max_ms = r["batch_ms"]
    what = "close(cancel_pending=True)" if r["cancel_pending"] else "close() (drain)"
    return (
        f"[{what} under load: {r['mode']}] returned in {r['close_ms']:.1f} ms = {r['close_ms'] / median_ms:.1f} median "
        f"batch times ({median_ms:.1f} ms; max {max_ms:.1f} ms); {r['pending_at_close']} requests pending, "
        f"{r['batches_after_close']} batches started after close(); {r['cancelled']} cancelled, "
        f"{r['refused_after_close']} calls refused as closed, {r['ok']} correct answers, mismatched {r['mismatched']}, "
        f"hung threads {r['hung']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per mode")
    parser.add_argument("--clients", type=int, default=64, help="client threads")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--max_valid_num", type=int, default=40)
    parser.add_argument("--segment_max_size", type=int, default=128)
    parser.add_argument("--timeout_microseconds", type=int, default=5000)
    parser.add_argument("--time_limit", type=float, default=600, help="seconds per soak phase; clients stop sending after it")
    names = [mode for mode, _ in MODES]
    parser.add_argument("--modes", nargs="+", choices=names, default=names)
    parser.add_argument("--no_inject", action="store_true", help="do not make one batch fail midway")
    parser.add_argument("--no_close", action="store_true", help="skip the close()-under-load phases")
    parser.add_argument("--rss_growth_mb", type=float, default=100, help="allowed RSS growth after warm-up")
    parser.add_argument("--close_slack_ms", type=float, default=50, help="allowed scheduling slack for close()")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    print(f"soak: {args.clients} clients x {args.requests} requests per mode, lengths 1..{args.segment_max_size}, "
          f"batch {args.batch}x{args.seq}, max_valid_num {args.max_valid_num}, "
          f"timeout {args.timeout_microseconds} us, onnxruntime {ort.__version__}, {len(os.sched_getaffinity(0))} cores",
          flush=True)
    workload = make_workload(args.requests, args.segment_max_size, args.seed)
    print(f"reference: the original model on all {len(workload)} requests, by length, in {time.perf_counter() - t0:.1f} s",
          flush=True)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, algorithm in MODES:
            if mode not in args.modes:
                continue
            path = compile_artifact(Path(tmp), mode, args.batch, args.seq, args.max_valid_num, args.segment_max_size)
            report = soak(path, mode, algorithm, workload, args.clients, args.timeout_microseconds, args.time_limit,
                          inject=not args.no_inject)
            print(format_soak(report), flush=True)
            problems += [f"{report['mode']}: {p}" for p in check_soak(report, args.rss_growth_mb)]
            if args.no_close:
                continue
            for cancel in (False, True):
                report = close_under_load(path, mode, algorithm, workload, args.clients, args.timeout_microseconds, cancel)
                print(format_close(report), flush=True)
                problems += [f"{report['mode']} close: {p}" for p in check_close(report, args.close_slack_ms)]
    print(f"total {time.perf_counter() - t0:.0f} s")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("PASSED: zero lost, zero mismatched, zero hung; the injected failure failed only its batch; memory stable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
