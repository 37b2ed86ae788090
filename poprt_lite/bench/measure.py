"""Run the selected benchmark modes on the same requests, in one process, and compare them.

The modes and their families are in `bench/modes.py`: the padded static baseline, the original
dynamic-shape model offline (each request alone; sorted batches) and online (one request at a time;
a dynamic batcher), and every packed way of serving, offline and online. The offline modes run
interleaved batch by batch; the online ones after them, one at a time, each with the same clients.

Throughput is requests / time of the mode (host batching, model, output split and, online, any idle
time included). Every mode is compared with the padded baseline (`speedup`) and with the best dynamic
mode of its kind, offline or online (`vs_dynamic`). MAE is taken against the original model run on
each request alone (the `offline_dynamic_per_request` mode's outputs; computed untimed when that
mode is not selected), over each request's real tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poprt_lite.ir.artifact import Artifact
from poprt_lite.bench.config import BenchConfig, Progress
from poprt_lite.bench.modes import (
    REFERENCE_MODE,
    Context,
    DynamicOffline,
    Mode,
    PADDED_MODE,
    ModeResult,
    OfflineRun,
    artifact_kinds,
    run_offline,
    run_online,
    select_modes,
)
from poprt_lite.runtime.offline import default_algorithm
from poprt_lite.runtime import modes as pack_modes
from poprt_lite.vocab import Dim

__all__ = ["BenchConfig", "BenchResult", "ModeResult", "Progress", "run_benchmark"]


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
        return asdict(self)


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


# ------------------------------------------------------------------------------ comparisons


def reference_outputs(ctx: Context, runs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The original model's outputs on each request alone: the reference mode's, or computed now."""
    if REFERENCE_MODE in runs:
        return runs[REFERENCE_MODE].results
    ctx.progress.step("running the original model on each request alone (the MAE reference, untimed)")
    run = DynamicOffline(Mode(REFERENCE_MODE, "reference", DynamicOffline, per_request=True), ctx)
    for batch in run.batches:
        run.run_batch(batch)
    return run.results


def compare(results: list[ModeResult], outputs: dict[str, dict[str, np.ndarray]], reference: dict[str, np.ndarray], ctx: Context) -> None:
    """Fill each result's speed-ups and its MAE against `reference`."""
    by_name = {r.name: r for r in results}
    padded = by_name.get(PADDED_MODE)
    best = {}
    for online in (False, True):
        dynamic = [r for r in results if r.dynamic and r.online == online]
        if dynamic:
            best[online] = max(dynamic, key=lambda r: r.samples_per_s)
    w = ctx.workload
    for r in results:
        if padded is not None:
            r.speedup = r.samples_per_s / padded.samples_per_s
            if r.cpu.get("own_seconds") and padded.cpu.get("own_seconds"):
                r.cpu_speedup = padded.cpu["own_seconds"] / r.cpu["own_seconds"]
        if r.online in best:
            ref = best[r.online]
            r.vs_dynamic = r.samples_per_s / ref.samples_per_s
            r.vs_dynamic_mode = ref.name
            if r.cpu.get("own_seconds") and ref.cpu.get("own_seconds"):
                r.cpu_vs_dynamic = ref.cpu["own_seconds"] / r.cpu["own_seconds"]
        r.mae, r.mae_max = {}, {}
        for name, ref in reference.items():
            diff = np.abs(outputs[r.name][name].astype(np.float64) - ref)
            diff = diff.reshape(len(diff), -1).mean(axis=1)
            per_request = np.add.reduceat(diff, w.offsets) / w.lengths
            r.mae[name] = float(per_request.mean())
            r.mae_max[name] = float(per_request.max())


def host_packing(ctx: Context) -> dict[str, Any]:
    """Host-side cost of packing, per request: planning the whole dataset, building feeds,
    gathering outputs (vectorised), and `packing_utils.pack_data` for reference."""
    from poprt_lite.runtime import packing_utils

    c, w = ctx.config, ctx.workload
    out: dict[str, Any] = {}
    for kind in (k for k in ctx.artifacts if k is not None):
        plans, feeder = ctx.plan(kind), ctx.artifact_feeder(kind)
        start = time.perf_counter()
        feeds = [feeder.feeds(p) for p in plans]
        build = time.perf_counter() - start
        del feeds
        fakes = [_fake_outputs(ctx.artifacts[kind].manifest, p) for p in plans]
        sink = ctx.buffers()
        start = time.perf_counter()
        for p, fake in zip(plans, fakes):
            feeder.gather(p, fake, sink)
        split = time.perf_counter() - start
        requests = [w.request(i) for i in range(w.size)]
        start = time.perf_counter()
        index = 0
        while index < w.size:
            index = packing_utils.pack_data(
                requests, index, c.batch_size, c.max_seq_len, c.max_valid_num, 1,
                position_offset=ctx.position_offset, mode=kind,
            ).count
        pack_data = time.perf_counter() - start
        out[str(kind)] = {
            "plan_us_per_request": ctx.plan_seconds[kind] / w.size * 1e6,
            "build_feeds_us_per_request": build / w.size * 1e6,
            "split_outputs_us_per_request": split / w.size * 1e6,
            "packing_utils_pack_data_us_per_request": pack_data / w.size * 1e6,
            "offline_algorithm": c.offline_algorithm or default_algorithm(plans[0].layout).value,
        }
    return out


def _fake_outputs(manifest: dict[str, Any], batch) -> dict[str, np.ndarray]:
    """Zero outputs of an artifact's shapes for `batch` (a dynamic dim: the batch's tokens,
    requests or longest request)."""
    dims = {Dim.tokens: batch.placement.tokens, Dim.requests: len(batch), Dim.longest: int(batch.placement.lengths.max())}
    return {
        s["name"]: np.zeros([d if isinstance(d, int) else dims[Dim(d)] for d in s["shape"]], np.float32)
        for s in manifest["outputs"]
    }


# -------------------------------------------------------------------------------------- run


def prepare_models(config: BenchConfig, kinds: tuple[str | None, ...], progress: Progress) -> tuple[Path, dict[str | None, Artifact]]:
    """The original model (exported on first use unless `--model`) and its compiled artifacts."""
    from poprt_lite.bench.export import cached_bert_qa, default_cache_dir
    from poprt_lite.bench.models import prepare_artifacts

    work_dir = Path(config.work_dir) if config.work_dir else default_cache_dir()
    model = config.model
    if model is None:
        progress.step(f"exporting the {config.geometry.tag} model (torch, random weights) unless cached")
        model = cached_bert_qa(work_dir, config.geometry)
    artifacts = prepare_artifacts(
        model, work_dir, batch_size=config.batch_size, seq_len=config.max_seq_len,
        max_valid_num=config.max_valid_num, segment_max_size=config.max_seq_len, kinds=kinds,
        ort_fusions=config.ort_fusions, on_step=progress.step,
    ) if kinds else {}
    return Path(model), artifacts


def workload_context(workload: str, kinds: tuple[str | None, ...], **overrides: Any) -> Context:
    """A preset workload's requests and models (prepared as the bench prepares them), for the
    benchmarks/ scripts that time single batches of the bench."""
    config = BenchConfig.preset(workload, **overrides)
    original, artifacts = prepare_models(config, kinds, Progress())
    return Context(config, original, artifacts, Progress())


def run_benchmark(
    config: BenchConfig,
    progress: Progress | None = None,
    prepare: Callable[[BenchConfig, tuple, Progress], tuple[Path, dict[str | None, Artifact]]] | None = None,
) -> BenchResult:
    """Prepare the models, run the selected modes, compare them, and measure op costs."""
    progress = progress or Progress()
    t_start = time.perf_counter()
    modes = select_modes(config.modes)
    kinds = artifact_kinds(modes)
    original, artifacts = (prepare or prepare_models)(config, kinds, progress)
    ctx = Context(config, original, artifacts, progress)
    w = ctx.workload
    runs = {m.name: m.family(m, ctx) for m in modes}
    offline = [r for r in runs.values() if isinstance(r, OfflineRun)]
    results = []
    if offline:
        progress.step("running " + ", ".join(r.mode.label for r in offline) + " (interleaved batch by batch)")
        results += run_offline(offline)
    for run in (r for r in runs.values() if r.online):
        progress.step(f"running {run.mode.label}")
        results.append(run_online(run))
    order = {m.name: k for k, m in enumerate(modes)}
    results.sort(key=lambda r: order[r.name])
    compare(results, {name: run.results for name, run in runs.items()}, reference_outputs(ctx, runs), ctx)
    progress.step("measuring host-side packing")
    host = host_packing(ctx)
    op_costs = None
    # The op costs compare attention on packed rows with attention on the unpacked rows of a static artifact.
    if config.op_costs and any(k is not None and pack_modes.get(k).static and pack_modes.get(k).layout.across_rows for k in artifacts):
        from poprt_lite.bench.opcost import measure_op_costs

        progress.step("timing Unpack/Repack/AttentionMask and attention alone")
        model_ms: dict[str, dict[str, float]] = {}
        for m, r in zip(modes, results):
            if m.pack is not None and not m.dynamic:
                model_ms.setdefault(m.pack, {})[r.name] = r.model_ms_per_batch
        op_costs = measure_op_costs(ctx, model_ms)
    c = config
    return BenchResult(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        machine=machine_info(config.n_threads),
        workload={
            "name": c.workload,
            "requests": w.size,
            "real_tokens": w.total_tokens,
            "mean_length": float(w.lengths.mean()),
            "padded_tokens_per_real_token": w.size * c.max_seq_len / w.total_tokens,
            "batches_of_tokens": w.total_tokens / (c.batch_size * c.max_seq_len),
            "best_speedup_at_this_size": -(-w.size // c.batch_size) / -(-w.total_tokens // (c.batch_size * c.max_seq_len)),
            "lengths": f"{c.lengths}, numpy seed {c.seed}",
            "model": str(c.model) if c.model else f"exported {c.geometry.tag} (random weights)",
            "clients": min(c.n_clients, w.size),
        },
        modes=results,
        op_costs=op_costs,
        host_packing=host,
        seconds_total=time.perf_counter() - t_start,
    )
