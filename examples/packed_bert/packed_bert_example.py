"""Packed BERT question answering on poprt-lite: padded baseline vs offline and online packing.

The workflow of PopRT's packed BERT guide, on onnxruntime. For each mode the script prints the
throughput, the latency and the mean absolute error (over each request's real tokens) of the
outputs against the padded baseline:

1. padded baseline: one request per row, padded to max_seq_len (`packing_utils.pad_data`);
2. offline packing (`packing_utils.pack_data`), unpack/repack model and AttentionMask model;
3. online packing with `runtime.Runner(popef, PackRunnerConfig(...))`: unpack/repack, and
   AttentionMask with first_fit and next_fit;
4. a latency test: many client threads, each sending one request at a time (average and P99).

By default it converts `testdata/bert_qa_torchscript.onnx` (a tiny BERT QA export) three times, as
these commands would:

    poprt-lite --input_model bert.onnx --output_model bert_bs16_sl256.onnx --export_position_ids \\
        --input_shape input_ids=16,256 attention_mask=16,256 token_type_ids=16,256
    poprt-lite --input_model bert.onnx --output_model bert_bs16_sl256_pack.onnx \\
        --input_shape input_ids=16,256 attention_mask=16,256 token_type_ids=16,256 \\
        --pack_args max_valid_num=40 segment_max_size=256
    poprt-lite ... --pack_args max_valid_num=40 segment_max_size=256 mode=attention_mask

PopRT's own commands (its run.sh: the model with a position_ids input, then `--pack_args ...
head_pattern=... dynamic_groups=[[input_ids,]]` and `--passes insert_attention_mask`) run verbatim
with `poprt` replaced by `poprt-lite`; tests/cli/test_poprt_compat.py runs this script on them.

Pass `--model_without_packing`, `--model_with_packing_unpack_repack` and
`--model_with_packing_attention_mask` to use models converted beforehand (then `--batch_size` and
`--max_seq_len` must match their input shape).

    python examples/packed_bert/packed_bert_example.py [--iterations 100] [--precision fp16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import poprt_lite
from poprt_lite import packing_utils, runtime
from poprt_lite.backend import get_session

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("start_logits", "end_logits")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class BertInputs:
    """One request, unpadded: the fields `packing_utils.pack_data` reads."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    position_ids: np.ndarray
    input_len: int


@dataclass
class Result:
    """One mode's run: each request's outputs (its real tokens only) and the timings."""

    name: str
    outputs: list[dict[str, np.ndarray]]
    seconds: float
    latency_ms: float | None = None  # mean submit-to-result time of a request (online modes)
    note: str = ""

    @property
    def throughput(self) -> float:
        return len(self.outputs) / self.seconds


def synthetic_dataset(args) -> list[BertInputs]:
    """Request lengths from clip(Normal(avg, avg), 1, max_seq_len), as in PopRT's example."""
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(rng.normal(args.avg_seq_len, args.avg_seq_len, args.dataset_size).astype(np.int32), 1, args.max_seq_len)
    return [
        BertInputs(
            input_ids=rng.integers(3, args.emb_size, n).astype(np.int32),
            attention_mask=np.ones(n, np.int32),
            token_type_ids=rng.integers(0, 2, n).astype(np.int32),
            position_ids=np.arange(n, dtype=np.int32),
            input_len=int(n),
        )
        for n in lengths
    ]


def convert_models(args, workdir: Path) -> None:
    """The three conversions of the guide, with poprt_lite.compile (the CLI's Python API)."""
    shapes = {name: (args.batch_size, args.max_seq_len) for name in INPUTS}
    pack = {"max_valid_num": str(args.max_valid_num), "segment_max_size": str(args.max_seq_len)}
    jobs = {
        "model_without_packing": dict(export_position_ids=True),
        "model_with_packing_unpack_repack": dict(pack_args=pack),
        "model_with_packing_attention_mask": dict(pack_args={**pack, "mode": "attention_mask"}),
    }
    for attr, extra in jobs.items():
        if getattr(args, attr):
            continue
        options = poprt_lite.CompileOptions(precision=args.precision, input_shape=shapes, **extra)
        output = workdir / f"{attr}.onnx"
        poprt_lite.compile(args.source_model, output, options=options)
        setattr(args, attr, str(output))


def unpack_batch(batch, outputs, across_rows) -> list[tuple[int, dict[str, np.ndarray]]]:
    per_output = [packing_utils.unpack_outputs(batch, out, across_rows) for out in outputs]
    return [
        (spec.index, {name: parts[k].copy() for name, parts in zip(OUTPUTS, per_output)})
        for k, spec in enumerate(batch.specs)
    ]


def run_padded(args, datasets) -> Result:
    """The baseline: `batch_size` requests per run, each padded to max_seq_len."""
    sess = get_session(args.model_without_packing, 1, "poprt").load()
    start = time.perf_counter()
    batches = [
        packing_utils.pad_data(datasets, index, args.batch_size, args.max_seq_len)
        for index in range(0, len(datasets), args.batch_size)
    ]
    prepared = time.perf_counter()
    results = [None] * len(datasets)
    for batch in batches:
        outputs = sess.run(list(OUTPUTS), batch.data)
        for index, out in unpack_batch(batch, outputs, across_rows=False):
            results[index] = out
    end = time.perf_counter()
    note = f"padding {1e6 * (prepared - start) / len(datasets):.1f} us/sample, {len(batches)} batches"
    return Result("Original (padded)", results, end - start, note=note)


def run_offline(args, datasets, model_path, across_rows) -> Result:
    """Offline packing: pack the whole dataset into batches, run them, split the outputs."""
    sess = get_session(model_path, 1, "poprt").load()
    start = time.perf_counter()
    batches, index = [], 0
    while index < len(datasets):
        batch = packing_utils.pack_data(
            datasets, index, args.batch_size, args.max_seq_len, args.max_valid_num, segment_num=1, across_rows=across_rows
        )
        batches.append(batch)
        index = batch.count
    prepared = time.perf_counter()
    results = [None] * len(datasets)
    for batch in batches:
        feeds = dict(batch.data)
        if across_rows:
            feeds["unpack_info"] = batch.unpack_info
        outputs = sess.run(list(OUTPUTS), feeds)
        for index, out in unpack_batch(batch, outputs, across_rows):
            results[index] = out
    end = time.perf_counter()
    name = "Pack Offline " + ("Unpack Repack" if across_rows else "AttentionMask")
    note = (
        f"packing {1e6 * (prepared - start) / len(datasets):.1f} us/sample, {len(batches)} batches, "
        f"{len(datasets) / len(batches):.2f} samples/batch"
    )
    return Result(name, results, end - start, note=note)


def make_runner(args, model_path, workdir, single_row, algorithm="first_fit"):
    """Export the artifact (executable.popef) and open a PackRunner on it."""
    export_dir = workdir / f"popef_{Path(model_path).stem}"
    get_session(model_path, 1, "poprt", output_dir=str(export_dir), export_popef=True).load()
    config = runtime.PackRunnerConfig(
        timeout_microseconds=args.timeout_microseconds,
        max_valid_num=args.max_valid_num,
        dynamic_input_name=args.dynamic_input_name,
    )
    config.algorithm = runtime.PackAlgorithm.next_fit if algorithm == "next_fit" else runtime.PackAlgorithm.first_fit
    if single_row:
        config.enable_input_single_row_mode("attention_mask")
    return runtime.Runner(str(export_dir / "executable.popef"), config)


def run_online(args, datasets, model_path, workdir, single_row, algorithm="first_fit") -> Result:
    """Online packing: every request is sent on its own; the PackRunner packs them."""
    latencies = np.zeros(len(datasets))
    with make_runner(args, model_path, workdir, single_row, algorithm) as runner:
        pending = []
        start = time.perf_counter()
        for i, data in enumerate(datasets):
            feeds = {
                "input_ids": data.input_ids,
                "attention_mask": data.attention_mask,
                "token_type_ids": data.token_type_ids,
                "position_ids": data.position_ids,
            }
            outputs = {name: np.zeros(args.max_seq_len, np.float32) for name in OUTPUTS}
            sent = time.perf_counter()
            future = runner.execute_async(feeds, outputs)
            future.add_done_callback(lambda _, i=i, sent=sent: latencies.__setitem__(i, time.perf_counter() - sent))
            pending.append((future, outputs, data.input_len))
        results = []
        for future, outputs, n in pending:
            future.wait()
            results.append({name: outputs[name][:n] for name in OUTPUTS})
        end = time.perf_counter()
        stats = runner.stats
    name = "Pack Online " + (f"AttentionMask({algorithm})" if single_row else "Unpack Repack")
    return Result(name, results, end - start, latency_ms=1e3 * latencies.mean(), note=str(stats))


def latency_test(args, datasets, model_path, workdir, algorithm="first_fit") -> dict[str, float]:
    """Concurrent clients, one request in flight each; drop each client's first and last 20%."""
    clients = int(args.batch_size * 3.5)
    per_client = args.latency_requests
    durations, errors = [], []
    lock = threading.Lock()
    with make_runner(args, model_path, workdir, True, algorithm) as runner:

        def client(seed):
            rng = np.random.default_rng(seed)
            mine = []
            try:
                for _ in range(per_client):
                    data = datasets[int(rng.integers(len(datasets)))]
                    feeds = {"input_ids": data.input_ids, "attention_mask": data.attention_mask,
                             "token_type_ids": data.token_type_ids}  # position_ids are filled in
                    outputs = {name: np.zeros(args.max_seq_len, np.float32) for name in OUTPUTS}
                    sent = time.perf_counter()
                    runner.execute(feeds, outputs)
                    mine.append((sent, time.perf_counter()))
            except Exception as exc:  # reported after the join
                errors.append(exc)
            skip = int(per_client * 0.2)
            with lock:
                durations.extend(mine[skip : len(mine) - skip])

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = runner.stats
    if errors:
        raise errors[0]
    times = np.sort([end - begin for begin, end in durations])
    span = max(end for _, end in durations) - min(begin for begin, _ in durations)
    return {
        "clients": clients,
        "requests": clients * per_client,
        "throughput": len(durations) / span,
        "avg_ms": 1e3 * float(times.mean()),
        "p99_ms": 1e3 * float(times[int(len(times) * 0.99)]),
        "stats": str(stats),
    }


def mean_absolute_errors(expected: Result, actual: Result) -> dict[str, float]:
    """Per output: the mean over requests of the mean absolute error over the request's tokens."""
    assert len(expected.outputs) == len(actual.outputs)
    return {
        name: float(np.mean([np.abs(e[name] - a[name]).mean() for e, a in zip(expected.outputs, actual.outputs)]))
        for name in OUTPUTS
    }


def print_mae(title, expected, actual) -> dict[str, float]:
    maes = mean_absolute_errors(expected, actual)
    print(f"\n{title}")
    for name, value in maes.items():
        print(f"{name} average mae: {value:.3g}")
    return maes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="packed BERT QA on poprt-lite: padded vs offline vs online packing")
    parser.add_argument("--source_model", default=str(ROOT / "testdata" / "bert_qa_torchscript.onnx"),
                        help="exported model to convert when the converted models are not given")
    parser.add_argument("--model_without_packing", help="converted padded model (with a position_ids input)")
    parser.add_argument("--model_with_packing_unpack_repack", help="converted model, --pack_args (unpack/repack)")
    parser.add_argument("--model_with_packing_attention_mask", help="converted model, --pack_args mode=attention_mask")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="precision when converting")
    parser.add_argument("--batch_size", type=int, default=16, help="batch size of the models")
    parser.add_argument("--max_seq_len", type=int, default=256, help="seq_len of the models and longest request")
    parser.add_argument("--avg_seq_len", type=int, default=128, help="mean (and spread) of the request lengths")
    parser.add_argument("--max_valid_num", type=int, default=40, help="most requests in one packed batch")
    parser.add_argument("--emb_size", type=int, default=1000, help="vocabulary size (token ids are below it)")
    parser.add_argument("--dynamic_input_name", default="input_ids", help="input whose length is the request's")
    parser.add_argument("--iterations", type=int, default=50, help="dataset size = iterations x batch_size")
    parser.add_argument("--timeout_microseconds", type=int, default=5000, help="PackRunner's batching timeout")
    parser.add_argument("--latency_requests", type=int, default=20, help="requests per client in the latency test")
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args(argv)
    args.dataset_size = args.iterations * args.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        began = time.perf_counter()
        convert_models(args, workdir)
        print(f"Models ready in {time.perf_counter() - began:.1f} s (batch {args.batch_size}x{args.max_seq_len}, "
              f"max_valid_num {args.max_valid_num}; converted from {Path(args.source_model).name} "
              f"in {args.precision} unless given)")
        datasets = synthetic_dataset(args)
        tokens = sum(d.input_len for d in datasets)
        print(f"{len(datasets)} requests, mean length {tokens / len(datasets):.1f}, real tokens "
              f"{tokens / (len(datasets) * args.max_seq_len):.1%} of the padded slots\n")

        runs = [run_padded(args, datasets)]
        runs.append(run_offline(args, datasets, args.model_with_packing_unpack_repack, across_rows=True))
        runs.append(run_online(args, datasets, args.model_with_packing_unpack_repack, workdir, single_row=False))
        runs.append(run_offline(args, datasets, args.model_with_packing_attention_mask, across_rows=False))
        for algorithm in ("first_fit", "next_fit"):
            runs.append(run_online(args, datasets, args.model_with_packing_attention_mask, workdir, True, algorithm))
        for run in runs:
            latency = f", mean request latency {run.latency_ms:.2f} ms" if run.latency_ms is not None else ""
            print(f"[{run.name}] Throughput: {run.throughput:.1f} samples/s, Latency: "
                  f"{1e3 * run.seconds / len(run.outputs):.3f} ms/sample{latency}")
            print(f"    {run.note}")

        latency = latency_test(args, datasets, args.model_with_packing_attention_mask, workdir)
        print(f"\n[Pack Online AttentionMask(first_fit), {latency['clients']} concurrent clients, "
              f"{latency['requests']} requests] Throughput: {latency['throughput']:.1f} samples/s, "
              f"Average Latency: {latency['avg_ms']:.2f} ms, P99 latency: {latency['p99_ms']:.2f} ms")
        print(f"    {latency['stats']}")

        original, by_name = runs[0], {run.name: run for run in runs}
        maes = {}
        for run in runs[1:]:
            maes[run.name] = print_mae(f"Compare results between original and {run.name}", original, run)
        print_mae("Compare results between offline and online pack with unpack repack op",
                  by_name["Pack Offline Unpack Repack"], by_name["Pack Online Unpack Repack"])
        print_mae("Compare results between offline and online_next_fit pack with attention_mask op",
                  by_name["Pack Offline AttentionMask"], by_name["Pack Online AttentionMask(next_fit)"])

    print("\nSummary (MAE against the padded baseline)")
    print(f"{'mode':<36} {'samples/s':>10} {'speed-up':>9} {'start MAE':>10} {'end MAE':>10}")
    for run in runs:
        mae = maes.get(run.name, {name: 0.0 for name in OUTPUTS})
        print(f"{run.name:<36} {run.throughput:>10.1f} {run.throughput / original.throughput:>8.2f}x "
              f"{mae['start_logits']:>10.2g} {mae['end_logits']:>10.2g}")
    worst = max(max(m.values()) for m in maes.values())
    limit = 1e-4 if args.precision == "fp32" else 1e-2
    print(f"largest MAE {worst:.2g} ({'below' if worst < limit else 'ABOVE'} {limit:g})")
    return 0 if worst < limit else 1


if __name__ == "__main__":
    sys.exit(main())
