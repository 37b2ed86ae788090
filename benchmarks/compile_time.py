"""Compile time and memory: poprt-lite's conversion against onnxruntime's transformer optimizer.

For BERT-base (~420 MB), BERT-large (~1.3 GB) and a 48-layer BERT of ~2.5 GB (over protobuf's
2 GB, so its weights are external data), all with random weights and exported on first use into
the cache (`~/.cache/poprt-lite`, `pip install '.[export]'`), this runs, each in a fresh process:

- poprt-lite's conversion in each packing mode, with the flags of PopRT's example
  (`--input_shape input_ids=16,256 attention_mask=16,256 token_type_ids=16,256
  --pack_args max_valid_num=40 segment_max_size=256 mode=...`; token_stream: no `--input_shape`,
  `max_tokens=4096`), written to a scratch folder;
- `onnxruntime.transformers.optimizer.optimize_model(path, "bert", heads, hidden)` and saving its
  result (with external data over 2 GB), on the same file.

Runs are interleaved (every tool and mode once, then again), `--repeats` times. Each is measured from
outside: wall time, CPU time (user + system) and peak RSS of that process (`os.wait4`). poprt-lite
runs also report each pass (wall, CPU) and the time to open the model and to write it. The table
prints medians with the spread (min-max) and peak RSS as a multiple of the model's size on disk.

`--ort_optimized` also converts, in each mode, what onnxruntime's optimizer made of the model
(made once and kept in the cache as `<model>.ort_optimized.onnx`): the pipeline's first pass,
`unfuse_ort`, rewrites its fused ops into standard ONNX before packing.

`--check` then converts the ~2.5 GB model once per mode with `--check --export_popef` (the
converted model against the source on onnxruntime, request by request), loads the artifact (its
weights member mapped) and compares one packed batch run from the artifact with the same batch
run from the converted .onnx file.

    python benchmarks/compile_time.py                    # all three models, 3 repeats (1 for 2.5 GB)
    python benchmarks/compile_time.py --models base --repeats 5 --json compile_time.json
    python benchmarks/compile_time.py --models 2.5gb --repeats 1 --check
    python benchmarks/compile_time.py --models base --no_ort --ort_optimized
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poprt_lite.bench import export  # noqa: E402

MODELS = {"base": export.BERT_BASE, "large": export.BERT_LARGE, "2.5gb": export.BERT_2_5GB}
MODES = ("attention_mask", "unpack_repack", "token_stream")
SHAPE = ("input_ids=16,256", "attention_mask=16,256", "token_type_ids=16,256")
PACK = ("max_valid_num=40", "segment_max_size=256")


STREAM = ("max_tokens=4096",)  # token_stream: no --input_shape (the stream is dynamic), 16 x 256 tokens at most


def flags_for(mode: str) -> list[str]:
    """The conversion flags of `mode`."""
    if mode == "token_stream":
        return ["--pack_args", *PACK, *STREAM, f"mode={mode}"]
    return ["--input_shape", *SHAPE, "--pack_args", *PACK, f"mode={mode}"]


def options_for(mode: str) -> dict:
    """The CompileOptions fields of `flags_for(mode)`."""
    shapes = {item.split("=")[0]: tuple(int(d) for d in item.split("=")[1].split(",")) for item in SHAPE}
    pack = dict(item.split("=") for item in PACK)
    if mode == "token_stream":
        return {"pack_args": {**pack, **dict(item.split("=") for item in STREAM), "mode": mode}}
    return {"input_shape": shapes, "pack_args": {**pack, "mode": mode}}


# --- the measured processes -------------------------------------------------------------------


def child_poprt(model: str, mode: str, out: str) -> dict:
    """One conversion, as `poprt-lite --input_model model ... --output_dir out` runs it."""
    from poprt_lite import compile
    from poprt_lite.compiler import CompileOptions

    start, cpu = time.perf_counter(), time.process_time()
    marks = []

    def done(record) -> None:
        marks.append((record, time.perf_counter(), time.process_time()))

    result = compile(model, output_dir=out, options=CompileOptions(**options_for(mode)), on_pass_done=done)
    end, cpu_end = time.perf_counter(), time.process_time()
    first, first_at, first_cpu = marks[0]
    last_at, last_cpu = marks[-1][1], marks[-1][2]
    return {
        "open_s": first_at - first.seconds - start,
        "open_cpu_s": first_cpu - first.cpu_seconds - cpu,
        "passes": [{"name": r.name, "s": r.seconds, "cpu_s": r.cpu_seconds} for r, _, _ in marks],
        "write_s": end - last_at,
        "write_cpu_s": cpu_end - last_cpu,
        "output_bytes": sum(p.stat().st_size for p in Path(out).iterdir()),
        "output": str(result.output_model),
    }


def child_ort(model: str, heads: int, hidden: int, out: str) -> dict:
    """onnxruntime's transformer optimizer on the same file, and saving what it made."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    ort.set_default_logger_severity(3)
    start = time.perf_counter()
    optimized = optimize_model(model, model_type="bert", num_heads=heads, hidden_size=hidden)
    optimized_at = time.perf_counter()
    print(json.dumps({"optimize_s": optimized_at - start}), flush=True)  # kept if saving fails
    large = file_size(Path(model)) > 2**31 - 1
    target = Path(out) / "optimized.onnx"
    optimized.save_model_to_file(str(target), use_external_data_format=large)
    return {
        "optimize_s": optimized_at - start,
        "write_s": time.perf_counter() - optimized_at,
        "output_bytes": sum(p.stat().st_size for p in Path(out).iterdir()),
    }


def child_check(model: str, mode: str, out: str) -> dict:
    """`poprt-lite ... --check --export_popef` in this process, then the artifact run against the
    converted model file on one packed batch."""
    import numpy as np
    import onnx

    from poprt_lite.compiler import verify
    from poprt_lite.ir.artifact import load_artifact
    from poprt_lite.cli.main import main
    from poprt_lite.runtime import ModelRunner

    flags = ["--input_model", model, "--output_dir", out, "--export_popef", "--check", *flags_for(mode)]
    start = time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(flags)
    if code != 0:
        return {"exit_code": code}
    checked_at = time.perf_counter()
    # "check: start_logits max abs diff 1.2e-06"
    diffs = {line.split()[1]: float(line.split()[-1]) for line in printed.getvalue().splitlines() if line.startswith("check: ")}
    converted = next(p for p in Path(out).glob("*.poprt-lite.onnx"))
    graph = onnx.load(converted, load_external_data=False)
    artifact = load_artifact(Path(out) / "executable.popef")
    meta = {p.key: p.value for p in graph.metadata_props}
    vocab_rows = int(meta.get("poprt_lite.vocab_size", 1000))
    requests = verify.make_requests(np.random.default_rng(1), np.random.default_rng(2).integers(1, 257, 40), vocab_rows)
    _, from_file = verify.run_packed(graph, requests, verify.session(converted))
    _, from_artifact = verify.run_packed(graph, requests, ModelRunner(artifact).session)
    difference = max(float(np.abs(a - b).max()) for x, y in zip(from_artifact, from_file) for a, b in zip(x, y))
    return {
        "exit_code": code,
        "check_s": checked_at - start,
        "check_max_abs_diff": diffs,
        "artifact_members": sorted(zipfile.ZipFile(artifact.path).namelist()),
        "artifact_weights_bytes": artifact.weights.nbytes if artifact.weights is not None else 0,
        "artifact_vs_file_max_abs_diff": difference,
        "artifact_requests": len(from_file),
    }


# --- the parent: runs, interleaving, tables ---------------------------------------------------


OPTIMIZED_INPUT = "(onnxruntime-optimized input)"


def ort_optimized(model: Path, geometry, scratch: Path) -> Path:
    """What onnxruntime's optimizer makes of `model`, made once beside it in the cache."""
    target = model.with_name(f"{model.stem}.ort_optimized.onnx")
    if not target.is_file():
        scratch.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--child", "ort", str(model), str(geometry.heads), str(geometry.hidden), str(scratch)], check=True)
        shutil.move(scratch / "optimized.onnx", target)
    return target


def file_size(model: Path) -> int:
    data = model.with_name(model.name + ".data")
    return model.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def measure(args: list[str], scratch: Path, memory_cap: int) -> dict:
    """Run this script as `--child ...` in a new process (address space capped at `memory_cap`
    bytes, so a run that would need more fails alone instead of exhausting a shared machine); its
    wall, CPU and peak RSS, and what it printed."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", *args, str(scratch)], stdout=subprocess.PIPE, text=True, preexec_fn=cap
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(scratch, ignore_errors=True)
    lines = output.strip().splitlines()
    details = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if process.returncode != 0:
        details["error"] = f"exit code {process.returncode} (address space capped at {memory_cap / 2**30:.0f} GB)"
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024, **details}


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    return f"{model}, {os.cpu_count()} cores, {memory / 2**20:.0f} GB RAM, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="base,large,2.5gb", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"packing modes: {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model (the 2.5 GB model: at most 1 unless --repeats is given)")
    parser.add_argument("--no_ort", action="store_true", help="skip onnxruntime's optimizer")
    parser.add_argument("--check", action="store_true", help="also --check and run the artifact of the 2.5 GB model per mode")
    parser.add_argument("--ort_optimized", action="store_true", help="also convert onnxruntime's optimizer output of each model in each mode")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for outputs (default: a temporary folder in the cache)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--memory_cap_gb", type=float, default=14, help="address-space limit of each measured process")
    parser.add_argument(
        "--check_memory_cap_gb", type=float, default=20, help="the same for the --check runs (an onnxruntime session of the model at a time)"
    )
    args, rest = parser.parse_known_args()
    repeats_given = "--repeats" in sys.argv
    names = [n for n in args.models.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    cache = export.default_cache_dir()
    scratch_root = args.scratch or Path(tempfile.mkdtemp(prefix="compile_time.", dir=cache))
    report = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "models": {}}
    print(f"machine: {report['machine']}\ncommand: {report['command']}\n", flush=True)
    for name in names:
        geometry = MODELS[name]
        path = export.cached_bert_qa(cache, geometry)
        size = file_size(path)
        runs: dict[str, list[dict]] = {}
        rounds = args.repeats if (repeats_given or name != "2.5gb") else 1
        kinds = [f"poprt-lite {m}" for m in modes] + ([] if args.no_ort else ["onnxruntime optimizer"])
        fused = ort_optimized(path, geometry, scratch_root) if args.ort_optimized else None
        kinds += [f"poprt-lite {m} {OPTIMIZED_INPUT}" for m in modes] if fused is not None else []
        for round_ in range(rounds):
            for kind in kinds:
                if kind.startswith("poprt-lite"):
                    child = ["poprt", str(fused if kind.endswith(OPTIMIZED_INPUT) else path), kind.split()[1]]
                else:
                    child = ["ort", str(path), str(geometry.heads), str(geometry.hidden)]
                result = measure(child, scratch_root / "run", int(args.memory_cap_gb * 2**30))
                runs.setdefault(kind, []).append(result)
                print(
                    f"{name} round {round_ + 1}/{rounds} {kind}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
                    f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GB" + (f" ({result['error']})" if "error" in result else ""),
                    flush=True,
                )
        report["models"][name] = {"path": str(path), "bytes": size, "geometry": vars(geometry), "runs": runs}
        print_model(name, size, runs)
    if args.check:
        path = export.cached_bert_qa(cache, MODELS["2.5gb"])
        cap = int(args.check_memory_cap_gb * 2**30)
        checks = {mode: measure(["check", str(path), mode], scratch_root / "check", cap) for mode in modes}
        report["check"] = checks
        print("\n2.5 GB model, `--check --export_popef` per mode:")
        print("| mode | exit | --check max abs diff | --check wall (s) | peak RSS (GB) | artifact members | weights member (GB) | artifact vs .onnx max abs diff |")
        print("|---|---:|---|---:|---:|---|---:|---:|")
        for mode, c in checks.items():
            print(
                f"| {mode} | {c.get('exit_code', c.get('error'))} | "
                f"{', '.join(f'{k} {v:.2g}' for k, v in c.get('check_max_abs_diff', {}).items())} | {c.get('check_s', 0):.0f} | {c['peak_rss_bytes'] / 2**30:.1f} | "
                f"{', '.join(c.get('artifact_members', []))} | {c.get('artifact_weights_bytes', 0) / 2**30:.2f} | {c.get('artifact_vs_file_max_abs_diff', float('nan')):.3g} |"
            )
    if args.scratch is None:
        shutil.rmtree(scratch_root, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


def print_model(name: str, size: int, runs: dict[str, list[dict]]) -> None:
    print(f"\n{name}: {size / 2**30:.2f} GB on disk; median (min-max) over {max(len(r) for r in runs.values())} runs")
    print("| tool | wall (s) | CPU (s) | peak RSS (GB) | peak RSS / model size |")
    print("|---|---:|---:|---:|---:|")
    for kind, results in runs.items():
        ok = [r for r in results if "error" not in r]
        print(
            f"| {kind} | {spread([r['wall_s'] for r in ok])} | {spread([r['cpu_s'] for r in ok])} | "
            f"{spread([r['peak_rss_bytes'] / 2**30 for r in ok], '{:.2f}')} | {spread([r['peak_rss_bytes'] / size for r in ok], '{:.2f}')}x |"
            + (f" failed: {results[0]['error']}" if not ok else "")
            + (f"; optimize_model had finished in {statistics.median(r['optimize_s'] for r in results if 'optimize_s' in r):.0f} s" if not ok and any("optimize_s" in r for r in results) else "")
        )
    for kind, results in runs.items():
        ok = [r for r in results if "passes" in r]
        if not ok:
            continue
        print(f"\n{name}, {kind}: wall / CPU seconds per step, median")
        steps = [("open", "open_s", "open_cpu_s")]
        steps += [(p["name"], None, None) for p in ok[0]["passes"]]
        steps += [("write", "write_s", "write_cpu_s")]
        cells = []
        for index, (step, wall_key, cpu_key) in enumerate(steps):
            if wall_key is not None:
                walls, cpus = [r[wall_key] for r in ok], [r[cpu_key] for r in ok]
            else:
                walls, cpus = [r["passes"][index - 1]["s"] for r in ok], [r["passes"][index - 1]["cpu_s"] for r in ok]
            cells.append(f"{step} {statistics.median(walls):.2f} / {statistics.median(cpus):.2f}")
        print("  " + "; ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *params = sys.argv[2:]
        if kind == "poprt":
            details = child_poprt(*params)
        elif kind == "ort":
            model, heads, hidden, out = params
            details = child_ort(model, int(heads), int(hidden), out)
        else:
            details = child_check(*params)
        print(json.dumps(details), flush=True)
    else:
        main()
