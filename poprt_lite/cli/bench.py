"""`poprt-lite bench`: packed vs padded throughput, latency and accuracy on one set of requests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from poprt_lite.cli import options
from poprt_lite.errors import PoprtError

SMALL = {  # the CI preset: tiny model, tiny batches; well under a minute on 2 cores
    "iterations": 8, "batch_size": 4, "avg_seq_len": 32, "max_seq_len": 64, "max_valid_num": 10,
    "timeout_microseconds": 2000,
}
FULL = {"iterations": 40, "batch_size": 16, "avg_seq_len": 128, "max_seq_len": 256, "max_valid_num": 40,
        "timeout_microseconds": 15000}


class _RichProgress:
    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=False,
        )

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def step(self, message: str) -> None:
        self.bar.console.log(message)

    def start(self, label: str, total: int):
        return self.bar.add_task(label, total=total)

    def advance(self, n: int, task) -> None:
        self.bar.advance(task, n)

    def finish(self, task) -> None:
        pass


def bench_command(
    model: Annotated[Optional[Path], typer.Option("--model", help="ONNX encoder to benchmark (default: export BERT-base QA with random weights; needs torch).")] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="Requests = iterations x batch_size (default 40; --small 8).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch_size", help="Rows per batch (default 16).")] = None,
    avg_seq_len: Annotated[Optional[int], typer.Option("--avg_seq_len", help="Mean and std of the request lengths (default 128).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max_seq_len", help="Seq_len of a row and longest request (default 256).")] = None,
    max_valid_num: Annotated[Optional[int], typer.Option("--max_valid_num", help="Most requests per packed batch (default 40).")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Onnxruntime intra-op threads (0: one per core).")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write every number to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw speed-up and latency per mode to this PNG (needs matplotlib: pip install '.[plot]').")] = None,
    small: Annotated[bool, typer.Option("--small", help="CI preset: tiny batches (and a tiny exported model unless --model).")] = False,
    timeout_microseconds: Annotated[Optional[int], typer.Option("--timeout_microseconds", help="PackRunner timeout (default 15000).")] = None,
    clients: Annotated[Optional[int], typer.Option("--clients", help="Concurrent clients of the online modes (default 2 x max_valid_num).")] = None,
    offline_algorithm: Annotated[str, typer.Option("--offline_algorithm", help="Offline packing: best_fit_decreasing, spfhp, first_fit, next_fit.")] = "best_fit_decreasing",
    modes: Annotated[Optional[str], typer.Option("--modes", help="Comma-separated subset of the modes (default: all).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work_dir", help="Cache for the exported and compiled models (default ~/.cache/poprt-lite).")] = None,
    op_costs: Annotated[bool, typer.Option("--op_costs/--no_op_costs", help="Time Unpack/Repack/AttentionMask and attention alone.")] = True,
    ort_fusions: Annotated[bool, typer.Option("--ort_fusions", help="Apply onnxruntime's transformer optimizer fusions to every compiled model (padded and packed).")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no_progress", help="Show a progress bar.")] = True,
) -> None:
    """Benchmark padded vs packed inference (offline and online, both packing modes) on the same requests."""
    from rich.console import Console

    from poprt_lite.bench.measure import MODE_NAMES, BenchConfig, Progress, run_benchmark
    from poprt_lite.bench.report import print_report, write_json, write_plot

    preset = SMALL if small else FULL
    values = {
        "iterations": iterations, "batch_size": batch_size, "avg_seq_len": avg_seq_len, "max_seq_len": max_seq_len,
        "max_valid_num": max_valid_num, "timeout_microseconds": timeout_microseconds,
    }
    resolved = {k: (preset[k] if v is None else v) for k, v in values.items()}
    for k, v in resolved.items():
        if v < (0 if k == "timeout_microseconds" else 1):
            raise PoprtError(f"--{k} must be a positive integer, got {v}")
    if resolved["avg_seq_len"] > resolved["max_seq_len"]:
        raise PoprtError(f"--avg_seq_len {resolved['avg_seq_len']} exceeds --max_seq_len {resolved['max_seq_len']}")
    if threads < 0 or (clients is not None and clients < 1):
        raise PoprtError("--threads must be >= 0 and --clients >= 1")
    if model is not None and not model.is_file():
        raise PoprtError(f"model '{model}' does not exist")
    from poprt_lite.bench.packer import OFFLINE_ALGORITHMS

    if offline_algorithm not in OFFLINE_ALGORITHMS:
        raise PoprtError(f"--offline_algorithm must be one of {', '.join(OFFLINE_ALGORITHMS)}, got '{offline_algorithm}'")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401  (checked before a long run, not after it)
        except ImportError:
            raise PoprtError("--plot needs matplotlib; pip install 'poprt-lite[plot]' or drop --plot") from None
    selected = tuple(m.strip() for m in modes.split(",") if m.strip()) if modes else MODE_NAMES
    config = BenchConfig(
        model=model, work_dir=work_dir, threads=threads, clients=clients, offline_algorithm=offline_algorithm,
        modes=selected, op_costs=op_costs, small=small, ort_fusions=ort_fusions, **resolved,
    )
    console = Console(stderr=True, log_path=False)
    out = Console()
    quiet = options.current().quiet
    status = Console(quiet=quiet)
    if progress and not quiet:
        with _RichProgress(console) as bar:
            result = run_benchmark(config, bar)
    else:
        result = run_benchmark(config, Progress())
    print_report(result, out)
    if json_out is not None:
        write_json(result, json_out)
        status.print(f"wrote {json_out}")
    if plot is not None:
        write_plot(result.to_json(), plot)
        status.print(f"wrote {plot}")
