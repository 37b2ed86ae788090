"""`poprt-lite bench`: packed vs padded vs dynamic-shape throughput, latency and accuracy on one set of requests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from poprt_lite.cli import options
from poprt_lite.errors import PoprtError
from poprt_lite.runtime.session import check_threads

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
    workload: Annotated[str, typer.Option("--workload", help="Requests and model: seed (PopRT's BERT-base example, default) or queries (short requests, MiniLM geometry).")] = "seed",
    model: Annotated[Optional[Path], typer.Option("--model", help="ONNX encoder to benchmark (default: export BERT-base QA with random weights; needs torch).")] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="Requests = iterations x batch_size (default: seed 40, queries 250; --small 8, 16).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch_size", help="Rows per batch (default 16).")] = None,
    avg_seq_len: Annotated[Optional[int], typer.Option("--avg_seq_len", help="Mean of the request lengths (default: seed 128, queries 12).")] = None,
    std_seq_len: Annotated[Optional[int], typer.Option("--std_seq_len", help="Standard deviation of the request lengths (default: seed the mean, queries 6).")] = None,
    min_seq_len: Annotated[Optional[int], typer.Option("--min_seq_len", help="Shortest request (default: seed 1, queries 3).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max_seq_len", help="Seq_len of a row and longest request (default: seed 256, queries 128).")] = None,
    max_valid_num: Annotated[Optional[int], typer.Option("--max_valid_num", help="Most requests per packed batch (default: seed 40, queries 256).")] = None,
    threads: options.ThreadsOption = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write every number to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw speed-up and latency per mode to this PNG (needs matplotlib: pip install '.[plot]').")] = None,
    small: Annotated[bool, typer.Option("--small", help="CI preset: tiny batches (and a tiny exported model unless --model).")] = False,
    timeout_microseconds: Annotated[Optional[int], typer.Option("--timeout_microseconds", help="Batching timeout of the PackRunner and the dynamic batcher (default 15000).")] = None,
    clients: Annotated[Optional[int], typer.Option("--clients", help="Concurrent clients of the online modes (default: seed 2 x max_valid_num, queries 384).")] = None,
    offline_algorithm: Annotated[Optional[str], typer.Option("--offline_algorithm", help="Offline packing: best_fit_decreasing, spfhp, longest_first, first_fit, next_fit (default: longest_first for token_stream, best_fit_decreasing for the others).")] = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="Comma-separated subset of the modes (default: all).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work_dir", help="Cache for the exported and compiled models (default ~/.cache/poprt-lite).")] = None,
    op_costs: Annotated[bool, typer.Option("--op_costs/--no_op_costs", help="Time Unpack/Repack/AttentionMask and attention alone.")] = True,
    ort_fusions: Annotated[bool, typer.Option("--ort_fusions", help="Apply onnxruntime's transformer optimizer fusions to every compiled model (padded and packed).")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no_progress", help="Show a progress bar.")] = True,
) -> None:
    """Benchmark packed vs padded vs dynamic-shape inference (offline and online) on the same requests."""
    from rich.console import Console

    from poprt_lite.bench.config import WORKLOADS, BenchConfig, Progress
    from poprt_lite.bench.measure import run_benchmark
    from poprt_lite.bench.report import print_report, write_json, write_plot

    if workload not in WORKLOADS:
        raise PoprtError(f"--workload must be one of {', '.join(WORKLOADS)}, got '{workload}'")
    values = {
        "iterations": iterations, "batch_size": batch_size, "avg_seq_len": avg_seq_len, "std_seq_len": std_seq_len,
        "min_seq_len": min_seq_len, "max_seq_len": max_seq_len, "max_valid_num": max_valid_num,
        "timeout_microseconds": timeout_microseconds, "clients": clients,
    }
    for k, v in values.items():
        if v is not None and v < (0 if k == "timeout_microseconds" else 1):
            raise PoprtError(f"--{k} must be a positive integer, got {v}")
    check_threads(threads)
    if model is not None and not model.is_file():
        raise PoprtError(f"model '{model}' does not exist")
    from poprt_lite.bench.packer import OFFLINE_ALGORITHMS

    if offline_algorithm is not None and offline_algorithm not in OFFLINE_ALGORITHMS:
        raise PoprtError(f"--offline_algorithm must be one of {', '.join(OFFLINE_ALGORITHMS)}, got '{offline_algorithm}'")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401  (checked before a long run, not after it)
        except ImportError:
            raise PoprtError("--plot needs matplotlib; pip install 'poprt-lite[plot]' or drop --plot") from None
    selected = tuple(m.strip() for m in modes.split(",") if m.strip()) if modes else None
    config = BenchConfig.preset(
        workload, small, model=model, work_dir=work_dir, threads=threads, offline_algorithm=offline_algorithm,
        modes=selected, op_costs=op_costs, ort_fusions=ort_fusions, **values,
    )
    lengths = config.lengths
    if not lengths.low <= lengths.mean <= lengths.high:
        raise PoprtError(
            f"--avg_seq_len {lengths.mean} must lie between --min_seq_len {lengths.low} and --max_seq_len {lengths.high}"
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
