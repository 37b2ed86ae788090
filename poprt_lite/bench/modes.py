"""The benchmark's modes: one table (`MODES`), one small class per mode family, and the two drivers.

Families (a mode is a family plus its settings):

- `StaticOffline`: a compiled static artifact on a `ModelRunner`, batches planned ahead: the padded
  baseline (`pack=None`) or the whole dataset packed for a pack mode (`--offline_algorithm`);
- `DynamicOffline`: the original dynamic-shape model, each request alone at its own length, or the
  requests sorted by length in batches of `batch_size` padded to the batch's longest;
- `PackedOnline`: a PackRunner (what `runtime.Runner(artifact, PackRunnerConfig(...))` returns) serving concurrent clients;
- `DynamicOnline`: the original model behind a `DynamicBatcher` (runtime/dynamic_batcher.py) serving the same
  clients, one request at a time or up to `batch_size` per batch with the PackRunner's timeout.

`run_offline` runs every offline mode interleaved batch by batch (the mode furthest behind, by share
of its requests done, runs next), so that all see the same machine: on a shared or virtual machine
the speed of the same batch drifts by several percent over minutes. A mode's time is the sum of its
own batches' wall times (build feeds, run, gather outputs); a request's latency is its batch's.
`run_online` drives one online mode with `clients` closed-loop client threads, each sending one
unpadded request at a time; latency is per request, from `execute_async` to filled outputs.

Every registered pack mode (runtime/modes.py) gets an offline and online entry (one per algorithm of
its descriptor's `online_algorithms`), labelled by its descriptor: nothing here names a pack mode.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from poprt_lite import vocab
from poprt_lite.ir.artifact import Artifact
from poprt_lite.bench.config import BenchConfig, Progress
from poprt_lite.runtime.dynamic_batcher import DynamicBatcher
from poprt_lite.bench.models import word_embedding
from poprt_lite.bench.monitor import CpuMonitor, TimedSession, own_cpu
from poprt_lite.bench.packer import Batch, Feeder, plan_dynamic, plan_packed, plan_padded
from poprt_lite.bench.workload import Workload, make_workload
from poprt_lite.errors import PoprtError
from poprt_lite.runtime import ModelRunner, PackAlgorithm, PackRunner, PackRunnerConfig
from poprt_lite.runtime import modes as pack_modes
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import Layout, MetaKey, Role


@dataclass
class ModeResult:
    name: str
    label: str
    online: bool
    dynamic: bool  # runs the original dynamic-shape model
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
    overtakes: int | None = None  # PackRunner: requests its lookahead placed ahead of older ones
    cpu: dict[str, float | None] = field(default_factory=dict)
    speedup: float | None = None  # samples/s over the padded baseline's
    cpu_speedup: float | None = None  # padded CPU-seconds / this mode's: robust to other processes
    vs_dynamic: float | None = None  # samples/s over the best dynamic mode of its kind (offline, online)
    vs_dynamic_mode: str | None = None  # that mode
    cpu_vs_dynamic: float | None = None  # that mode's CPU-seconds / this mode's
    model_ms_series: list[float] = field(default_factory=list)  # every batch's model time, in run order
    mae: dict[str, float] | None = None  # output -> mean over requests of the per-request MAE vs the original
    mae_max: dict[str, float] | None = None  # output -> worst request

    @property
    def mae_worst_mean(self) -> float | None:
        return max(self.mae.values()) if self.mae else None


# --------------------------------------------------------------------------------- context


class Context:
    """What every mode of one run shares: settings, requests, models, output buffers and plans."""

    def __init__(
        self, config: BenchConfig, original: Path, artifacts: dict[str | None, Artifact], progress: Progress
    ) -> None:
        self.config, self.original, self.artifacts, self.progress = config, Path(original), artifacts, progress
        source = onnx.load(str(original), load_external_data=False)
        manifest = next(iter(artifacts.values())).manifest if artifacts else {}
        table = word_embedding(source)
        vocab_size = vocab.int_of(manifest, MetaKey.vocab_size) or (int(table.dims[0]) if table is not None else 1000)
        self.position_offset = vocab.int_of(manifest, MetaKey.position_offset)
        names = {i.name for i in source.graph.input}
        self.workload: Workload = make_workload(
            config.requests, config.lengths, vocab_size,
            with_token_types=any(vocab.role_of({}, n) is Role.token_type_ids for n in names),
            position_offset=self.position_offset, seed=config.seed,
        )
        self.outputs = _token_outputs(source)  # name -> trailing dims of one token
        self.plans: dict[Any, list[Batch]] = {}
        self.plan_seconds: dict[Any, float] = {}

    def buffers(self) -> dict[str, np.ndarray]:
        """One output array per output, every request's tokens in dataset order (NaN until filled)."""
        total = self.workload.total_tokens
        return {name: np.full((total, *trailing), np.nan, np.float32) for name, trailing in self.outputs.items()}

    def plan(self, pack: str | None) -> list[Batch]:
        """The offline batches of the padded baseline (None) or of a pack mode, planned once."""
        if pack not in self.plans:
            c, lengths = self.config, self.workload.lengths
            start = time.perf_counter()
            if pack is None:
                plans = plan_padded(lengths, c.batch_size, c.max_seq_len)
            else:
                plans = plan_packed(lengths, pack, c.batch_size, c.max_seq_len, c.max_valid_num, c.offline_algorithm)
            self.plan_seconds[pack] = time.perf_counter() - start
            self.plans[pack] = plans
        return self.plans[pack]

    def artifact_feeder(self, pack: str | None) -> Feeder:
        manifest = self.artifacts[pack].manifest
        inputs = {s["name"]: (vocab.spec_role(s), np.dtype(s["dtype"])) for s in manifest["inputs"]}
        outputs = {s["name"]: vocab.spec_layout(s) for s in manifest["outputs"]}
        return Feeder(self.workload, inputs, outputs)

    def original_session(self) -> TimedSession:
        return TimedSession(create_session(self.original, self.config.threads, spinning=SPINNING))

    def original_feeder(self, session) -> Feeder:
        inputs = {i.name: (vocab.role_of({}, i.name), _ORT_DTYPES[i.type]) for i in session.get_inputs()}
        return Feeder(self.workload, inputs, {name: Layout.padded for name in self.outputs})


# Every session of the bench runs without spinning (the PackRunner's default). The offline modes take
# turns batch by batch: a session whose threads spin after its run takes the cores from the next
# mode's run (measured on the queries workload: a request alone took 29 ms of model time offline,
# next to spinning sessions, and 5 ms online), and online the cores belong to the serving and client
# threads between runs.
SPINNING = False

_ORT_DTYPES = {"tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32), "tensor(float)": np.dtype(np.float32)}


def _token_outputs(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    outs = {}
    for value in model.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if len(dims) < 2 or any(d is None for d in dims[2:]):
            raise PoprtError(
                f"output '{value.name}' has shape {dims}; the benchmark compares per-token outputs "
                "[batch, sequence, ...] (QA-style models)"
            )
        outs[value.name] = tuple(dims[2:])
    return outs


# --------------------------------------------------------------------------------- families


class ModeRun:
    """One mode's state during a run; `results` receives every request's outputs in dataset order."""

    online: ClassVar[bool]
    dynamic: ClassVar[bool]

    def __init__(self, mode: Mode, ctx: Context) -> None:
        self.mode, self.ctx = mode, ctx
        self.results = ctx.buffers()
        self.timed: TimedSession | None = None


class OfflineRun(ModeRun):
    """A mode whose batches are planned ahead and run one at a time by `run_offline`."""

    online = False
    batches: list[Batch]
    feeder: Feeder

    def run_batch(self, batch: Batch) -> None:
        outs = self._run(list(self.ctx.outputs), self.feeder.feeds(batch))
        self.feeder.gather(batch, dict(zip(self.ctx.outputs, outs)), self.results)

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    @property
    def efficiency(self) -> float:
        return self.ctx.workload.total_tokens / sum(b.slots for b in self.batches)


class StaticOffline(OfflineRun):
    """A compiled artifact (padded or packed) on a ModelRunner, over the context's offline plan."""

    dynamic = False

    def __init__(self, mode: Mode, ctx: Context) -> None:
        super().__init__(mode, ctx)
        self.batches = ctx.plan(mode.pack)
        self.feeder = ctx.artifact_feeder(mode.pack)
        self.runner = ModelRunner(ctx.artifacts[mode.pack], threads=ctx.config.threads, spinning=SPINNING)
        self.timed = TimedSession.install(self.runner)

    def _run(self, names, feeds):
        return self.runner.run(names, feeds)


class DynamicOffline(OfflineRun):
    """The original model: each request alone, or sorted batches of `batch_size` padded to the longest."""

    dynamic = True

    def __init__(self, mode: Mode, ctx: Context) -> None:
        super().__init__(mode, ctx)
        self.batches = plan_dynamic(ctx.workload.lengths, 1 if mode.per_request else ctx.config.batch_size, sort=True)
        self.timed = ctx.original_session()
        self.feeder = ctx.original_feeder(self.timed)

    def _run(self, names, feeds):
        return self.timed.run(names, feeds)


class OnlineRun(ModeRun):
    """A server taking one request at a time (`execute_async`), driven by `run_online`."""

    online = True

    def open(self):
        """Start the server (warmed up, its session timed); return it."""
        raise NotImplementedError

    def request_roles(self) -> dict[str, Role]:
        """The input names a client sends, with their roles."""
        raise NotImplementedError

    def finish(self, server, result: ModeResult) -> None:
        """Record the server's own counters in `result`."""


class PackedOnline(OnlineRun):
    """A PackRunner on a packed artifact, with the benchmark's timeout and `max_valid_num`."""

    dynamic = False

    def open(self):
        c, artifact = self.ctx.config, self.ctx.artifacts[self.mode.pack]
        config = PackRunnerConfig(timeout_microseconds=c.timeout_microseconds, max_valid_num=c.max_valid_num)
        config.algorithm = self.mode.algorithm
        if pack_modes.get(self.mode.pack).one_row:  # PopRT's spelling, as its example does
            config.enable_input_single_row_mode(_input_with_role(artifact, Role.attention_mask))
        runner = PackRunner(artifact, config, threads=c.threads, spinning=SPINNING)
        self.interface = runner.interface
        batch = self.ctx.plan(self.mode.pack)[0]
        runner.session.run(None, self.ctx.artifact_feeder(self.mode.pack).feeds(batch))  # warm-up
        self.timed = TimedSession.install(runner)
        return runner

    def request_roles(self) -> dict[str, Role]:
        io = self.interface
        roles = {name: token.role for name, token in io.token_inputs.items()}
        if io.mask is not None:
            roles[io.mask[0]] = Role.attention_mask
        return roles

    def finish(self, server, result: ModeResult) -> None:
        stats = server.stats
        result.batches, result.packing_efficiency = stats.batches, stats.packing_efficiency
        result.batches_by_timeout, result.overtakes = stats.batches_by_timeout, stats.overtakes


class DynamicOnline(OnlineRun):
    """The original model behind a DynamicBatcher (one request at a time, or up to `batch_size`)."""

    dynamic = True

    def open(self):
        c = self.ctx.config
        self.timed = self.ctx.original_session()
        self.feeder = self.ctx.original_feeder(self.timed)
        batch = plan_dynamic(self.ctx.workload.lengths, c.batch_size, sort=False)[0]
        self.timed.run(None, self.feeder.feeds(batch))  # warm-up
        self.timed.spans.clear()
        max_batch = 1 if self.mode.per_request else c.batch_size
        return DynamicBatcher(self.timed, self.feeder.inputs, list(self.ctx.outputs), max_batch, c.timeout_microseconds)

    def request_roles(self) -> dict[str, Role]:
        return {name: role for name, (role, _) in self.feeder.inputs.items()}

    def finish(self, server, result: ModeResult) -> None:
        stats = server.stats
        result.batches, result.packing_efficiency = stats.batches, stats.packing_efficiency
        result.batches_by_timeout = stats.batches_by_timeout


def _input_with_role(artifact: Artifact, role: Role) -> str:
    return next(s["name"] for s in artifact.manifest["inputs"] if vocab.spec_role(s) is role)


# ----------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    name: str  # the JSON name
    label: str  # the table's
    family: type[ModeRun]
    pack: str | None = None  # static families: the artifact's pack mode (None: padded)
    algorithm: PackAlgorithm = PackAlgorithm.first_fit  # PackedOnline's packing
    per_request: bool = False  # dynamic families: each request alone

    @property
    def online(self) -> bool:
        return self.family.online

    @property
    def dynamic(self) -> bool:
        return self.family.dynamic


PADDED_MODE = Layout.padded.value  # the baseline: the padded static model, named after its layout



def _online(mode: pack_modes.ModeDescriptor) -> list[Mode]:
    """A pack mode's online entries: one per algorithm, named after it when there are several."""
    several = len(mode.online_algorithms) > 1
    return [
        Mode(f"online_{mode.name}" + (f"_{a.value}" if several else ""), f"online {mode.label}" + (f" {a.value}" if several else ""), PackedOnline, mode.name, a)
        for a in mode.online_algorithms
    ]


MODES = (
    Mode(PADDED_MODE, "padded baseline", StaticOffline),
    Mode("offline_dynamic_per_request", "offline dynamic, each request alone", DynamicOffline, per_request=True),
    Mode("offline_dynamic_sorted", "offline dynamic, sorted batches", DynamicOffline),
    *(Mode(f"offline_{m.name}", f"offline {m.label}", StaticOffline, m.name) for m in pack_modes.registered()),
    Mode("online_dynamic_per_request", "online dynamic, each request alone", DynamicOnline, per_request=True),
    Mode("online_dynamic_batching", "online dynamic batching", DynamicOnline),
    *(entry for m in pack_modes.registered() for entry in _online(m)),
)
MODE_NAMES = tuple(m.name for m in MODES)
REFERENCE_MODE = "offline_dynamic_per_request"  # its outputs are the original model run on each request alone


def select_modes(names: tuple[str, ...] | None) -> list[Mode]:
    if names is None:
        return list(MODES)
    unknown = [n for n in names if n not in MODE_NAMES]
    if unknown:
        raise PoprtError(f"unknown mode '{unknown[0]}'; modes: {', '.join(MODE_NAMES)}")
    return [m for m in MODES if m.name in names]


def artifact_kinds(modes: list[Mode]) -> tuple[str | None, ...]:
    """The static artifacts the modes run, padded first."""
    kinds = {m.pack for m in modes if not m.dynamic}
    return tuple(sorted(kinds, key=lambda k: "" if k is None else str(k)))


# ---------------------------------------------------------------------------------- drivers


def _latency(values: np.ndarray) -> tuple[float, float, float]:
    ms = np.asarray(values) * 1e3
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _result(run: ModeRun, seconds: float, latency: np.ndarray, kind: str, batches: int, efficiency: float, cpu) -> ModeResult:
    w, mode = run.ctx.workload, run.mode
    spans = np.asarray(run.timed.spans).reshape(-1, 2)
    model_seconds = float((spans[:, 1] - spans[:, 0]).sum())
    mean, p50, p99 = _latency(latency)
    return ModeResult(
        name=mode.name, label=mode.label, online=mode.online, dynamic=mode.dynamic,
        requests=w.size, tokens=w.total_tokens, seconds=seconds,
        samples_per_s=w.size / seconds, tokens_per_s=w.total_tokens / seconds,
        latency_mean_ms=mean, latency_p50_ms=p50, latency_p99_ms=p99, latency_kind=kind,
        batches=int(batches), packing_efficiency=float(efficiency), requests_per_batch=w.size / max(batches, 1),
        model_seconds=model_seconds, model_ms_per_batch=model_seconds / max(len(spans), 1) * 1e3,
        host_us_per_request=(seconds - model_seconds) / w.size * 1e6, cpu=cpu,
        model_ms_series=[round(float(v) * 1e3, 1) for v in spans[:, 1] - spans[:, 0]],
    )


def run_offline(runs: list[OfflineRun]) -> list[ModeResult]:
    """Run the offline modes batch by batch, interleaved (see the module docstring)."""
    if not runs:
        return []
    ctx = runs[0].ctx
    w, progress = ctx.workload, ctx.progress
    for run in runs:  # warm-up: allocations, kernel choices
        run.run_batch(run.batches[0])
    for run in runs:  # a second warm-up, interleaved: each session runs after the others did
        run.run_batch(run.batches[-1])
        run.timed.spans.clear()
    state = {id(run): {"next": 0, "done": 0, "seconds": 0.0, "cpu": 0.0, "latency": np.empty(w.size)} for run in runs}
    tasks = {id(run): progress.start(run.mode.label, w.size) for run in runs}
    monitor = CpuMonitor()
    while True:
        pending = [run for run in runs if state[id(run)]["next"] < len(run.batches)]
        if not pending:
            break
        run = min(pending, key=lambda r: state[id(r)]["done"])
        st = state[id(run)]
        batch = run.batches[st["next"]]
        cpu0, begin = own_cpu(), time.perf_counter()
        run.run_batch(batch)
        elapsed = time.perf_counter() - begin
        st["cpu"] += own_cpu() - cpu0
        st["latency"][batch.indices] = elapsed
        st["seconds"] += elapsed
        st["next"] += 1
        st["done"] += len(batch)
        progress.advance(len(batch), tasks[id(run)])
    shared = monitor.stop()
    results = []
    for run in runs:
        st = state[id(run)]
        progress.finish(tasks[id(run)])
        cpu = {**shared, "own_seconds": st["cpu"], "interleaved": True}
        results.append(_result(run, st["seconds"], st["latency"], "batch", len(run.batches), run.efficiency, cpu))
    return results


def run_online(run: OnlineRun) -> ModeResult:
    """Serve the whole workload to `clients` concurrent closed-loop clients through one server."""
    ctx = run.ctx
    c, w = ctx.config, ctx.workload
    server = run.open()
    try:
        roles = run.request_roles()
        feeds = [w.request_feeds(i, roles) for i in range(w.size)]
        ends = (w.offsets + w.lengths).tolist()
        outputs = [{name: buf[lo:hi] for name, buf in run.results.items()} for lo, hi in zip(w.offsets.tolist(), ends)]
        latency, submit = np.zeros(w.size), np.zeros(w.size)
        counter = itertools.count()
        errors: list[BaseException] = []
        clients = min(c.n_clients, w.size)
        barrier = threading.Barrier(clients + 1)
        task = ctx.progress.start(f"{run.mode.label} ({clients} clients)", w.size)

        def client() -> None:
            try:
                barrier.wait()
                while True:
                    i = next(counter)
                    if i >= w.size or errors:
                        return
                    t0 = time.perf_counter()
                    future = server.execute_async(feeds[i], outputs[i])
                    t1 = time.perf_counter()
                    future.result()
                    latency[i] = time.perf_counter() - t0
                    submit[i] = t1 - t0
                    ctx.progress.advance(1, task)
            except BaseException as exc:  # reported after the run
                errors.append(exc)

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
        ctx.progress.finish(task)
        if errors:
            raise PoprtError(f"{run.mode.label}: a client failed: {errors[0]}") from errors[0]
        result = _result(run, seconds, latency, "request", 0, 0.0, cpu)
        run.finish(server, result)
    finally:
        server.close()
    result.requests_per_batch = w.size / max(result.batches, 1)
    result.submit_us_per_request = float(submit.mean() * 1e6)
    spans = np.asarray(run.timed.spans)
    if len(spans) > 1:
        result.runner_gap_ms_per_batch = float(np.median(spans[1:, 0] - spans[:-1, 1]) * 1e3)
    return result
