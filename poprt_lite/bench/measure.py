"""Run every benchmark mode on the same requests, in one process, and collect the numbers.

Modes (PopRT's packed BERT example, on onnxruntime):

- `padded`: requests in order, `batch_size` per batch, each padded to `seq_len` (the baseline);
- `offline_unpack_repack`, `offline_attention_mask`: the whole dataset packed ahead of time
  (`--offline_algorithm`, default best_fit_decreasing), batches run back to back;
- `online_unpack_repack`, `online_attention_mask_first_fit`, `online_attention_mask_next_fit`:
  `runtime.Runner(artifact, PackRunnerConfig(...))` serving `clients` concurrent closed-loop
  clients, each sending one unpadded request at a time (with the default 2 x max_valid_num clients
  requests arrive faster than batches run, so the runner always has a batch's worth waiting).

The padded and offline modes run interleaved, batch by batch (the mode furthest behind runs next),
so that all of them see the same machine: on a shared or virtual machine the speed of the same batch
drifts by several percent over minutes, which would otherwise land in the speed-ups. Their time is
the sum of their own batches' wall times. The online modes run one after another (a PackRunner owns
its serving loop), each on the whole dataset.

Throughput is requests / time of the mode (host packing, model, output split and, online, any idle
time included). Latency is per request: for the online modes from `execute_async` to the
filled outputs under the concurrent clients; for the padded and offline modes, the wall time of the
request's batch (build feeds, run, split), as those requests never queue. Outputs of every mode land
in dataset order, so each mode's MAE against the padded outputs is taken over each request's real
tokens.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poprt_lite.artifact import Artifact
from poprt_lite.bench.monitor import CpuMonitor, TimedSession, own_cpu
from poprt_lite.bench.packer import (
    ATTENTION_MASK_MODE,
    PADDED,
    UNPACK_REPACK,
    BatchBuilder,
    BatchPlan,
    plan_offline,
    plan_padded,
)
from poprt_lite.bench.workload import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, TOKEN_TYPE_IDS, Workload, make_workload
from poprt_lite.errors import PoprtError
from poprt_lite.runtime import ModelRunner, PackAlgorithm, PackRunnerConfig, Runner


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    kind: str  # artifact: padded | unpack_repack | attention_mask
    online: bool
    algorithm: str | None = None  # online packing algorithm


MODES = (
    Mode("padded", "padded baseline", PADDED, False),
    Mode("offline_unpack_repack", "offline unpack/repack", UNPACK_REPACK, False),
    Mode("offline_attention_mask", "offline AttentionMask", ATTENTION_MASK_MODE, False),
    Mode("online_unpack_repack", "online unpack/repack", UNPACK_REPACK, True, "first_fit"),
    Mode("online_attention_mask_first_fit", "online AttentionMask first_fit", ATTENTION_MASK_MODE, True, "first_fit"),
    Mode("online_attention_mask_next_fit", "online AttentionMask next_fit", ATTENTION_MASK_MODE, True, "next_fit"),
)
MODE_NAMES = tuple(m.name for m in MODES)


@dataclass
class ModeResult:
    name: str
    label: str
    requests: int
    tokens: int
    seconds: float
    samples_per_s: float
    tokens_per_s: float
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_kind: str  # "batch" or "request"
    batches: int
    packing_efficiency: float  # real tokens / token slots of the batches run
    requests_per_batch: float
    model_seconds: float  # time inside the model (sum of session runs)
    model_ms_per_batch: float
    host_us_per_request: float  # wall time outside the model, per request
    submit_us_per_request: float | None = None  # online: client-side execute_async call
    runner_gap_ms_per_batch: float | None = None  # online: serving thread between two model runs
    batches_by_timeout: int | None = None
    overtakes: int | None = None  # online: requests the PackRunner's lookahead placed ahead of older ones
    cpu: dict[str, float | None] = field(default_factory=dict)
    speedup: float | None = None
    cpu_speedup: float | None = None  # padded CPU-seconds / this mode's: robust to other processes
    model_ms_series: list[float] = field(default_factory=list)  # every batch's model time, in run order
    mae: dict[str, float] | None = None  # output -> mean over requests of the per-request MAE
    mae_max: dict[str, float] | None = None  # output -> worst request

    @property
    def mae_worst_mean(self) -> float | None:
        return max(self.mae.values()) if self.mae else None


@dataclass
class BenchConfig:
    model: Path | None = None
    work_dir: Path | None = None
    iterations: int = 40
    batch_size: int = 16
    avg_seq_len: int = 128
    max_seq_len: int = 256
    max_valid_num: int = 40
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core
    timeout_microseconds: int = 15000
    clients: int | None = None  # online concurrent clients; default 2 * max_valid_num
    offline_algorithm: str = "best_fit_decreasing"
    modes: tuple[str, ...] = MODE_NAMES
    seed: int = 2023
    op_costs: bool = True
    small: bool = False
    ort_fusions: bool = False  # run onnxruntime's transformer optimizer on every compiled model

    @property
    def requests(self) -> int:
        return self.iterations * self.batch_size

    @property
    def n_clients(self) -> int:
        return self.clients if self.clients else 2 * self.max_valid_num

    @property
    def n_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


class Progress:
    """What the benchmark tells its caller while it runs (the CLI draws progress bars)."""

    def step(self, message: str) -> None: ...

    def start(self, label: str, total: int) -> Any:
        """A bar for `total` requests; returns its handle."""

    def advance(self, n: int, task: Any) -> None: ...

    def finish(self, task: Any) -> None: ...


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    workload: dict[str, Any]
    modes: list[ModeResult]
    op_costs: dict[str, Any] | None = None
    host_packing: dict[str, Any] | None = None
    seconds_total: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        return out


# --------------------------------------------------------------------------------- helpers


def _latency(values: np.ndarray) -> tuple[float, float, float]:
    ms = np.asarray(values) * 1e3
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _model_inputs(artifact: Artifact) -> dict[str, np.dtype]:
    return {spec["name"]: np.dtype(spec["dtype"]) for spec in artifact.manifest["inputs"]}


def _token_outputs(artifact: Artifact) -> list[tuple[str, tuple]]:
    outs = []
    for spec in artifact.manifest["outputs"]:
        if spec.get("layout", "padded") not in ("padded", "packed", "unpacked"):
            raise PoprtError(
                f"output '{spec['name']}' has layout '{spec.get('layout')}'; the benchmark compares token-level outputs (QA-style models)"
            )
        outs.append((spec["name"], tuple(spec["shape"][2:])))
    return outs


def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "intra_op_threads": threads}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import platform

    import onnxruntime

    info["python"] = platform.python_version()
    info["onnxruntime"] = onnxruntime.__version__
    info["numpy"] = np.__version__
    info["platform"] = platform.platform()
    return info


# --------------------------------------------------------------------------------- runs


class _Runs:
    """Everything shared by the modes of one benchmark run."""

    def __init__(self, config: BenchConfig, artifacts: dict[str, Artifact], progress: Progress) -> None:
        self.config = config
        self.artifacts = artifacts
        self.progress = progress
        padded = next(iter(artifacts.values()))
        manifest = padded.manifest
        self.vocab = int(manifest.get("vocab_size") or 1000)
        self.position_offset = int(manifest.get("position_offset") or 0)
        names = set(_model_inputs(padded))
        self.workload: Workload = make_workload(
            config.requests,
            config.avg_seq_len,
            config.max_seq_len,
            self.vocab,
            with_token_types=TOKEN_TYPE_IDS in names,
            position_offset=self.position_offset,
            seed=config.seed,
        )
        self.outputs = _token_outputs(padded)
        self.results: dict[str, dict[str, np.ndarray]] = {}
        self.plans: dict[str, list[BatchPlan]] = {}
        self.plan_seconds: dict[str, float] = {}

    def buffers(self) -> dict[str, np.ndarray]:
        total = self.workload.total_tokens
        return {name: np.full((total, *trailing), np.nan, np.float32) for name, trailing in self.outputs}

    def builder(self, kind: str) -> BatchBuilder:
        c = self.config
        return BatchBuilder(
            self.workload, kind, c.batch_size, c.max_seq_len, _model_inputs(self.artifacts[kind]),
            max_valid_num=c.max_valid_num, segment_max_size=c.max_seq_len,
        )

    def plan(self, kind: str) -> list[BatchPlan]:
        if kind not in self.plans:
            c = self.config
            start = time.perf_counter()
            if kind == PADDED:
                plans = plan_padded(self.workload.size, c.batch_size, c.max_seq_len)
            else:
                plans = plan_offline(self.workload.lengths, kind, c.batch_size, c.max_seq_len, c.max_valid_num, c.offline_algorithm)
            self.plan_seconds[kind] = time.perf_counter() - start
            self.plans[kind] = plans
        return self.plans[kind]

    # ------------------------------------------------------------------------------ offline

    def run_offline(self, modes: list[Mode]) -> list[ModeResult]:
        """Run the padded and offline modes batch by batch, interleaved: at each step the mode
        furthest behind (by share of its requests done) runs its next batch. Every mode thus sees
        the same machine conditions (a shared or virtual machine drifts by several percent over
        minutes); a mode's time is the sum of its own batches' wall times (build feeds, run, split)."""
        c, w = self.config, self.workload
        names = [name for name, _ in self.outputs]
        states = []
        for mode in modes:
            plans, builder = self.plan(mode.kind), self.builder(mode.kind)
            runner = ModelRunner(self.artifacts[mode.kind], threads=c.threads)
            runner.run(names, builder.build_feeds(plans[0]))  # warm-up: allocations, kernel choices
            states.append({
                "mode": mode, "plans": plans, "builder": builder, "runner": runner, "next": 0, "done": 0,
                "seconds": 0.0, "cpu": 0.0, "latency": np.empty(w.size), "results": self.buffers(),
                "task": self.progress.start(mode.label, w.size),
            })
        for st in states:  # a second warm-up, interleaved: each session runs after the others did
            st["runner"].run(names, st["builder"].build_feeds(st["plans"][-1]))
            st["timed"] = TimedSession(st["runner"].session)
            st["runner"].session = st["timed"]
        monitor = CpuMonitor()
        while True:
            pending = [st for st in states if st["next"] < len(st["plans"])]
            if not pending:
                break
            st = min(pending, key=lambda st: st["done"] / w.size)
            plan = st["plans"][st["next"]]
            cpu0, begin = own_cpu(), time.perf_counter()
            outs = st["runner"].run(names, st["builder"].build_feeds(plan))
            st["builder"].scatter_outputs(plan, dict(zip(names, outs)), st["results"])
            elapsed = time.perf_counter() - begin
            st["cpu"] += own_cpu() - cpu0
            st["latency"][plan.indices] = elapsed
            st["seconds"] += elapsed
            st["next"] += 1
            st["done"] += len(plan)
            self.progress.advance(len(plan), st["task"])
        shared = monitor.stop()
        results = []
        for st in states:
            self.progress.finish(st["task"])
            mode, plans = st["mode"], st["plans"]
            self.results[mode.name] = st["results"]
            slots = len(plans) * c.batch_size * c.max_seq_len
            cpu = {**shared, "own_seconds": st["cpu"], "interleaved": True}
            results.append(self._result(mode, st["seconds"], st["latency"], "batch", len(plans), w.total_tokens / slots, st["timed"], cpu))
        return results

    # ------------------------------------------------------------------------------- online

    def run_online(self, mode: Mode) -> ModeResult:
        c, w = self.config, self.workload
        artifact = self.artifacts[mode.kind]
        config = PackRunnerConfig(
            timeout_microseconds=c.timeout_microseconds, max_valid_num=c.max_valid_num, dynamic_input_name=INPUT_IDS
        )
        config.algorithm = PackAlgorithm.parse(mode.algorithm)
        if mode.kind == ATTENTION_MASK_MODE:
            config.enable_input_single_row_mode(ATTENTION_MASK)
        runner = Runner(artifact, config, threads=c.threads)
        try:
            names = set(_model_inputs(artifact))
            sent = tuple(n for n in (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS, POSITION_IDS) if n in names)
            holder = runner if hasattr(runner, "session") else runner.model  # the object owning the session
            holder.session.run(None, self.builder(mode.kind).build_feeds(self.plan(mode.kind)[0]))  # warm-up
            timed = TimedSession(holder.session)
            holder.session = timed
            results = self.buffers()
            feeds = [w.feeds(i, sent) for i in range(w.size)]
            ends = (w.offsets + w.lengths).tolist()
            outputs = [
                {name: buf[lo:hi] for name, buf in results.items()} for lo, hi in zip(w.offsets.tolist(), ends)
            ]
            latency = np.zeros(w.size)
            submit = np.zeros(w.size)
            counter = itertools.count()
            errors: list[BaseException] = []
            clients = min(c.n_clients, w.size)
            barrier = threading.Barrier(clients + 1)

            def client() -> None:
                try:
                    barrier.wait()
                    while True:
                        i = next(counter)
                        if i >= w.size or errors:
                            return
                        t0 = time.perf_counter()
                        future = runner.execute_async(feeds[i], outputs[i])
                        t1 = time.perf_counter()
                        future.result()
                        latency[i] = time.perf_counter() - t0
                        submit[i] = t1 - t0
                        self.progress.advance(1, task)
                except BaseException as exc:  # reported after the run
                    errors.append(exc)

            task = self.progress.start(f"{mode.label} ({clients} clients)", w.size)
            threads = [threading.Thread(target=client, name=f"bench-client-{k}", daemon=True) for k in range(clients)]
            for t in threads:
                t.start()
            monitor = CpuMonitor()
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
            cpu = monitor.stop()
            self.progress.finish(task)
            if errors:
                raise PoprtError(f"{mode.label}: a client failed: {errors[0]}") from errors[0]
            stats = runner.stats
        finally:
            runner.close()
        self.results[mode.name] = results
        result = self._result(mode, seconds, latency, "request", stats.batches, stats.packing_efficiency, timed, cpu)
        result.submit_us_per_request = float(submit.mean() * 1e6)
        result.batches_by_timeout = stats.batches_by_timeout
        result.overtakes = stats.overtakes
        spans = np.asarray(timed.spans)
        if len(spans) > 1:
            result.runner_gap_ms_per_batch = float(np.median(spans[1:, 0] - spans[:-1, 1]) * 1e3)
        return result

    def _result(self, mode, seconds, latency, kind, batches, efficiency, timed, cpu) -> ModeResult:
        w = self.workload
        spans = np.asarray(timed.spans).reshape(-1, 2)
        model_seconds = float((spans[:, 1] - spans[:, 0]).sum())
        mean, p50, p99 = _latency(latency)
        return ModeResult(
            name=mode.name,
            label=mode.label,
            requests=w.size,
            tokens=w.total_tokens,
            seconds=seconds,
            samples_per_s=w.size / seconds,
            tokens_per_s=w.total_tokens / seconds,
            latency_mean_ms=mean,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            latency_kind=kind,
            batches=int(batches),
            packing_efficiency=float(efficiency),
            requests_per_batch=w.size / max(batches, 1),
            model_seconds=model_seconds,
            model_ms_per_batch=model_seconds / max(len(spans), 1) * 1e3,
            host_us_per_request=(seconds - model_seconds) / w.size * 1e6,
            cpu=cpu,
            model_ms_series=[round(float(v) * 1e3, 1) for v in spans[:, 1] - spans[:, 0]],
        )

    # --------------------------------------------------------------------------------- MAE

    def compare(self, results: list[ModeResult]) -> None:
        base = self.results.get(PADDED)
        by_name = {r.name: r for r in results}
        padded = by_name.get(PADDED)
        w = self.workload
        for r in results:
            if padded is not None:
                r.speedup = r.samples_per_s / padded.samples_per_s
                if r.cpu.get("own_seconds") and padded.cpu.get("own_seconds"):
                    r.cpu_speedup = padded.cpu["own_seconds"] / r.cpu["own_seconds"]
            if base is None:
                continue
            r.mae, r.mae_max = {}, {}
            for name, ref in base.items():
                diff = np.abs(self.results[r.name][name].astype(np.float64) - ref)
                diff = diff.reshape(len(diff), -1).mean(axis=1)
                per_request = np.add.reduceat(diff, w.offsets) / w.lengths
                r.mae[name] = float(per_request.mean())
                r.mae_max[name] = float(per_request.max())

    # ----------------------------------------------------------------------- host packing

    def host_packing(self) -> dict[str, Any]:
        """Host-side cost of packing, per request: planning the whole dataset, building feeds,
        splitting outputs (vectorised), and `packing_utils.pack_data` for reference."""
        from poprt_lite import packing_utils

        c, w = self.config, self.workload
        out: dict[str, Any] = {}
        for kind in (k for k in (UNPACK_REPACK, ATTENTION_MASK_MODE) if k in self.artifacts):
            plans = self.plan(kind)
            builder = self.builder(kind)
            start = time.perf_counter()
            feeds = [builder.build_feeds(p) for p in plans]
            build = time.perf_counter() - start
            fake = {name: np.zeros((c.batch_size, c.max_seq_len, *trailing), np.float32) for name, trailing in self.outputs}
            if kind == UNPACK_REPACK:
                fake = {name: np.zeros((c.max_valid_num, c.max_seq_len, *trailing), np.float32) for name, trailing in self.outputs}
            sink = self.buffers()
            start = time.perf_counter()
            for p in plans:
                builder.scatter_outputs(p, fake, sink)
            split = time.perf_counter() - start
            del feeds
            requests = [w.request(i) for i in range(w.size)]
            start = time.perf_counter()
            index = 0
            while index < w.size:
                index = packing_utils.pack_data(
                    requests, index, c.batch_size, c.max_seq_len, c.max_valid_num, 1,
                    across_rows=kind == UNPACK_REPACK, position_offset=self.position_offset,
                ).count
            pack_data = time.perf_counter() - start
            out[kind] = {
                "plan_us_per_request": self.plan_seconds[kind] / w.size * 1e6,
                "build_feeds_us_per_request": build / w.size * 1e6,
                "split_outputs_us_per_request": split / w.size * 1e6,
                "packing_utils_pack_data_us_per_request": pack_data / w.size * 1e6,
                "offline_algorithm": c.offline_algorithm,
            }
        return out


def run_benchmark(
    config: BenchConfig,
    progress: Progress | None = None,
    prepare: Callable[[BenchConfig, Progress], dict[str, Artifact]] | None = None,
) -> BenchResult:
    """Prepare the artifacts, run the selected modes in order, compare, and measure op costs."""
    from poprt_lite.bench.models import prepare_artifacts

    progress = progress or Progress()
    t_start = time.perf_counter()
    unknown = [m for m in config.modes if m not in MODE_NAMES]
    if unknown:
        raise PoprtError(f"unknown mode '{unknown[0]}'; modes: {', '.join(MODE_NAMES)}")
    modes = [m for m in MODES if m.name in config.modes]
    kinds = tuple(k for k in (PADDED, UNPACK_REPACK, ATTENTION_MASK_MODE) if any(m.kind == k for m in modes))
    if prepare is not None:
        artifacts = prepare(config, progress)
    else:
        from poprt_lite.bench.export import Geometry, cached_bert_qa, default_cache_dir

        work_dir = Path(config.work_dir) if config.work_dir else default_cache_dir()
        model = config.model
        if model is None:
            geometry = Geometry(layers=2, hidden=64, heads=4, intermediate=128, vocab=1000) if config.small else Geometry()
            progress.step(f"exporting the {'tiny' if config.small else 'BERT-base'} model (torch, random weights)")
            model = cached_bert_qa(work_dir, geometry)
        artifacts = prepare_artifacts(
            model, work_dir, batch_size=config.batch_size, seq_len=config.max_seq_len,
            max_valid_num=config.max_valid_num, segment_max_size=config.max_seq_len, kinds=kinds,
            ort_fusions=config.ort_fusions, on_step=progress.step,
        )
    runs = _Runs(config, artifacts, progress)
    w = runs.workload
    results = []
    offline = [m for m in modes if not m.online]
    if offline:
        progress.step("running " + ", ".join(m.label for m in offline) + " (interleaved batch by batch)")
        results += runs.run_offline(offline)
    for mode in (m for m in modes if m.online):
        progress.step(f"running {mode.label}")
        results.append(runs.run_online(mode))
    runs.compare(results)
    progress.step("measuring host-side packing")
    host = runs.host_packing()
    op_costs = None
    if config.op_costs and UNPACK_REPACK in artifacts:
        from poprt_lite.bench.opcost import measure_op_costs

        progress.step("timing Unpack/Repack/AttentionMask and attention alone")
        model_ms = {r.name: r.model_ms_per_batch for r in results}
        op_costs = measure_op_costs(artifacts, runs, model_ms, config.n_threads)
    return BenchResult(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        machine=machine_info(config.n_threads),
        workload={
            "requests": w.size,
            "real_tokens": w.total_tokens,
            "mean_length": float(w.lengths.mean()),
            "padded_tokens_per_real_token": w.size * config.max_seq_len / w.total_tokens,
            "batches_of_tokens": w.total_tokens / (config.batch_size * config.max_seq_len),
            "best_speedup_at_this_size": (
                -(-w.size // config.batch_size) / -(-w.total_tokens // (config.batch_size * config.max_seq_len))
            ),
            "lengths": f"clip(int32(Normal({config.avg_seq_len}, {config.avg_seq_len})), 1, {config.max_seq_len}), numpy seed {config.seed}",
            "model": str(config.model) if config.model else "exported BERT-base QA (random weights)",
        },
        modes=results,
        op_costs=op_costs,
        host_packing=host,
        seconds_total=time.perf_counter() - t_start,
    )
