"""Render a benchmark result: a rich table, a markdown table (for the README), JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from poprt_lite.bench.measure import BenchResult, ModeResult
from poprt_lite.bench.modes import PADDED_MODE
from poprt_lite.vocab import Layout

# Acceptance targets (fp32). Over the padded baseline (issue 5), on the seed workload:
PADDED_TARGETS = {"seed": {"offline_attention_mask": 1.85, "online_attention_mask_first_fit": 1.75}}
# The best packed mode of each kind over a dynamic-shape mode (issue 13): workload -> online ->
# (the dynamic mode, or None for the best dynamic mode of that kind; the ratio).
DYNAMIC_TARGETS = {
    "queries": {False: ("offline_dynamic_sorted", 1.10), True: (None, 1.5)},
    "seed": {False: (None, 1.0), True: (None, 1.0)},
}
MAE_LIMIT = 1e-4
CONTENDED = 0.10  # other processes took more than this share of the CPUs: numbers are suspect

COLUMNS = (
    "mode", "samples/s", "tokens/s", "latency mean ms", "latency P99 ms", "packing eff.",
    "req/batch", "model ms/batch", "vs padded", "vs dynamic", "MAE vs original", "host µs/req", "other CPU",
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row(r: ModeResult) -> list[str]:
    other = r.cpu.get("other") if r.cpu else None
    return [
        r.label + (" *" if r.latency_kind == "request" else ""),
        f"{r.samples_per_s:.2f}",
        f"{r.tokens_per_s:.0f}",
        f"{r.latency_mean_ms:.0f}",
        f"{r.latency_p99_ms:.0f}",
        f"{r.packing_efficiency:.1%}",
        f"{r.requests_per_batch:.1f}",
        f"{r.model_ms_per_batch:.0f}",
        "-" if r.speedup is None else f"{r.speedup:.2f}x",
        "-" if r.vs_dynamic is None else f"{r.vs_dynamic:.2f}x",
        "-" if r.mae is None else ("0" if r.mae_worst_mean == 0 else f"{r.mae_worst_mean:.1e}"),
        f"{r.host_us_per_request:.0f}",
        _fmt(other, ".0%"),
    ]


def checks(result: BenchResult) -> list[tuple[str, bool, str]]:
    """(what, passed, detail) for the acceptance targets that this run can judge."""
    out = []
    by = {r.name: r for r in result.modes}
    full = not result.config.get("small")  # speed targets are for the full workloads
    workload = result.config.get("workload", "seed")
    for name, target in (PADDED_TARGETS.get(workload, {}) if full else {}).items():
        r = by.get(name)
        if r is not None and r.speedup is not None:
            out.append((f"{r.label} speed-up >= {target}x", r.speedup >= target, f"{r.speedup:.3f}x"))
    for online, (reference, target) in (DYNAMIC_TARGETS.get(workload, {}) if full else {}).items():
        packed = [r for r in result.modes if r.online == online and not r.dynamic and r.name != PADDED_MODE]
        dynamic = [r for r in result.modes if r.online == online and r.dynamic and reference in (None, r.name)]
        if not packed or not dynamic:
            continue
        best, ref = max(packed, key=_speed), max(dynamic, key=_speed)
        ratio = best.samples_per_s / ref.samples_per_s
        missed = "" if ratio >= target else f", missed by {1 - ratio / target:.1%}"
        what = f"best {'online' if online else 'offline'} packed mode >= {target}x {'the best ' + ('online' if online else 'offline') + ' dynamic mode' if reference is None else reference}"
        out.append((what, ratio >= target, f"{best.label} {best.samples_per_s:.2f}/s / {ref.label} {ref.samples_per_s:.2f}/s = {ratio:.3f}x{missed}"))
    for r in result.modes:
        if r.mae is not None:
            worst = max(r.mae_max.values())
            out.append((f"{r.label} MAE < {MAE_LIMIT:g}", r.mae_worst_mean < MAE_LIMIT, f"mean {r.mae_worst_mean:.2e}, worst request {worst:.2e}"))
    online = by.get("online_attention_mask_first_fit")
    if online is not None and full and workload == "seed":
        out.append(("online first_fit packing efficiency >= 90%", online.packing_efficiency >= 0.9, f"{online.packing_efficiency:.1%}"))
    return out


def _speed(r: ModeResult) -> float:
    return r.samples_per_s


def print_report(result: BenchResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    c, w, m = result.config, result.workload, result.machine
    table = Table(title=f"poprt-lite bench ({w.get('name', 'seed')}): {w['requests']} requests, batch {c['batch_size']}x{c['max_seq_len']}, max_valid_num {c['max_valid_num']}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in result.modes:
        table.add_row(*row(r))
    console.print(table)
    console.print(
        f"workload: {w['lengths']}; mean length {w['mean_length']:.1f}; padded/real tokens "
        f"{w['padded_tokens_per_real_token']:.3f} (the ideal speed-up); the real tokens fill "
        f"{w['batches_of_tokens']:.2f} batches, so no packing runs fewer than {-(-w['real_tokens'] // (c['batch_size'] * c['max_seq_len']))}: "
        f"best possible speed-up at this size {w['best_speedup_at_this_size']:.3f}x"
    )
    console.print(
        f"machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m.get('memory_gb', '?')} GB; onnxruntime "
        f"{m['onnxruntime']}, {m['intra_op_threads']} intra-op threads"
    )
    console.print(
        "latency: * = per request under "
        f"{min(c['clients'] or 2 * c['max_valid_num'], w['requests'])} concurrent clients "
        f"(batching timeout {c['timeout_microseconds']} µs); other rows: the request's batch. "
        "vs padded: samples/s over the padded baseline's; vs dynamic: over the best dynamic-shape mode of the same kind "
        f"({_best_dynamic(result)}). MAE vs original: against the original model run on each request alone. "
        "host µs/req: wall time outside the model per request. other CPU: share of the CPUs used by other processes."
    )
    for r in result.modes:
        if r.cpu and (r.cpu.get("other") or 0) > CONTENDED:
            console.print(f"[yellow]warning:[/] other processes used {r.cpu['other']:.0%} of the CPUs during {r.label}; its numbers are not trustworthy")
    if result.host_packing:
        for kind, h in result.host_packing.items():
            console.print(
                f"host packing ({kind}): plan {h['plan_us_per_request']:.1f} µs/req ({h['offline_algorithm']}), "
                f"build feeds {h['build_feeds_us_per_request']:.1f} µs/req, split outputs {h['split_outputs_us_per_request']:.1f} µs/req; "
                f"packing_utils.pack_data {h['packing_utils_pack_data_us_per_request']:.1f} µs/req"
            )
    cpu = [f"{r.label} {r.cpu_speedup:.2f}x" for r in result.modes if r.cpu_speedup is not None and r.name != PADDED_MODE]
    if cpu:
        console.print("speed-up in CPU time of this process (insensitive to other processes): " + ", ".join(cpu))
    cpu = [f"{r.label} {r.cpu_vs_dynamic:.2f}x" for r in result.modes if r.cpu_vs_dynamic is not None and not r.dynamic]
    if cpu:
        console.print("vs dynamic in CPU time of this process (the best dynamic mode's CPU-seconds / the mode's): " + ", ".join(cpu))
    online = [r for r in result.modes if r.submit_us_per_request is not None]
    for r in online:
        console.print(
            f"{r.label}: execute_async {r.submit_us_per_request:.0f} µs/req (client side), serving thread "
            f"{_fmt(r.runner_gap_ms_per_batch, '.1f')} ms between model runs, {r.batches_by_timeout} of {r.batches} batches launched by timeout"
            + ("" if r.overtakes is None else f", {r.overtakes} requests placed ahead of an older one that did not fit (lookahead)")
        )
    if result.op_costs:
        oc = result.op_costs
        for op in oc["ops"]:
            shares = ", ".join(f"{v:.1%} of {k}" for k, v in op["share_of_model"].items())
            console.print(
                f"{op['op']:13s} {str(op['input_shape']):20s} x{op['count_per_batch']:<3d} {op['ms_per_call']:7.2f} ms/call "
                f"{op['ms_per_batch']:8.1f} ms/batch  ({shares})"
            )
        att = oc.get("attention")
        if att:
            packed, unpacked = att[Layout.packed.value], att[Layout.unpacked.value]
            console.print(
                f"attention core per batch ({att['layers']} layers): packed {packed['row_count']} rows "
                f"{packed['ms_per_batch']:.0f} ms, unpacked {unpacked['row_count']} rows "
                f"{unpacked['ms_per_batch']:.0f} ms (+{att['extra_ms_per_batch_unpacked']:.0f} ms per batch for unpack/repack)"
            )
    for what, ok, detail in checks(result):
        console.print(f"{'[green]PASS[/]' if ok else '[red]MISS[/]'} {what}: {detail}")
    console.print(f"total {result.seconds_total:.0f} s")


def _best_dynamic(result: BenchResult) -> str:
    names = {}
    for r in result.modes:
        if r.vs_dynamic_mode is not None:
            names["online" if r.online else "offline"] = r.vs_dynamic_mode
    return ", ".join(f"{k}: {v}" for k, v in names.items()) or "no dynamic mode ran"


def markdown_table(result: BenchResult) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    for r in result.modes:
        lines.append("| " + " | ".join(row(r)) + " |")
    return "\n".join(lines)


def write_json(result: BenchResult, path: str | Path) -> None:
    data: dict[str, Any] = result.to_json()
    data["checks"] = [{"check": w, "passed": ok, "value": d} for w, ok, d in checks(result)]
    data["markdown_table"] = markdown_table(result)
    data["command"] = " ".join(["poprt-lite", *sys.argv[1:]])
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def write_plot(data: dict[str, Any], path: str | Path) -> None:
    """A PNG of a run (`BenchResult.to_json()`, or a `--json` file read back): speed-up over the
    padded baseline per mode, against the ideal and the best possible at this size, beside mean /
    P99 latency. Needs matplotlib (`pip install '.[plot]'`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    modes = [m for m in data["modes"] if m["speedup"] is not None]
    labels = [m["label"].replace(" ", "\n") for m in modes]
    w, c = data["workload"], data["config"]
    ideal, best = w["padded_tokens_per_real_token"], w["best_speedup_at_this_size"]
    fig, (speed, latency) = plt.subplots(1, 2, figsize=(16, 5.5), layout="constrained")
    colors = ["0.6" if m["name"] == PADDED_MODE else "tab:orange" if m.get("dynamic") else "tab:blue" for m in modes]
    bars = speed.bar(labels, [m["speedup"] for m in modes], color=colors)
    speed.bar_label(bars, labels=[f"{m['speedup']:.2f}x\n{m['packing_efficiency']:.0%}" for m in modes], fontsize=8)
    speed.axhline(ideal, color="tab:green", ls="--", lw=1, label=f"ideal {ideal:.2f}x")
    speed.axhline(best, color="tab:orange", ls=":", lw=1, label=f"best at {w['requests']} requests {best:.2f}x")
    speed.set_ylim(0, max(ideal, *(m["speedup"] for m in modes)) * 1.18)
    speed.set_ylabel("speed-up over padded (samples/s)")
    speed.set_title("throughput (bar labels: speed-up, packing efficiency; orange: dynamic shapes)")
    speed.legend(loc="upper left", fontsize=8)
    x = range(len(modes))
    latency.bar([i - 0.2 for i in x], [m["latency_mean_ms"] for m in modes], 0.4, label="mean")
    latency.bar([i + 0.2 for i in x], [m["latency_p99_ms"] for m in modes], 0.4, label="P99")
    latency.set_xticks(list(x), labels)
    latency.set_ylabel("ms")
    latency.set_title("latency (online: per request under concurrent clients; others: the batch)")
    latency.legend(fontsize=8)
    for ax in (speed, latency):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        f"poprt-lite bench: {w['requests']} requests, batch {c['batch_size']}x{c['max_seq_len']}, "
        f"max_valid_num {c['max_valid_num']}, {data['machine']['cpus']} CPUs"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
