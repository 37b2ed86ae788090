"""One AttentionMask batch with and without `fuse_packed_attention` (onnxruntime's MultiHeadAttention per block).

Compiles the AttentionMask artifact of a `poprt-lite bench` workload twice from the bench's model
and options, once without the pass and once with it (`--passes fuse_packed_attention`), and runs
the first offline batch the bench runs on it (the same feeds for both) `--rounds` times,
interleaved (the order alternates round by round, so both see the same machine). Sessions are the
bench's (poprt-lite's disabled fusions, no spinning), so this process's CPU time is the work
done: on a machine shared with other processes it moves far less than wall time. Prints, per
variant, the median and range over the rounds of wall and CPU ms per batch, the medians (and
ranges) of the per-round ratios unfused/fused, the node counts of both models and the largest
difference between their outputs.

Run from the repository root (models exported / compiled on first use):
    python benchmarks/fused_attention.py [--workload queries|seed] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import poprt_lite
from poprt_lite import compiler
from poprt_lite.bench.measure import workload_context
from poprt_lite.bench.models import token_inputs
from poprt_lite.bench.monitor import own_cpu
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import PackMode

PASS = "fuse_packed_attention"
MODE = PackMode.attention_mask


def compile_variants(ctx, folder: Path) -> dict[str, bytes]:
    """The AttentionMask model compiled as the bench compiles it, without and with the pass."""
    c = ctx.config
    shape = {name: (c.batch_size, c.max_seq_len) for name in token_inputs(ctx.original)}
    pack = {"max_valid_num": str(c.max_valid_num), "segment_max_size": str(c.max_seq_len), "mode": MODE.value}
    common = dict(input_shape=shape, pack_args=pack, export_position_ids=True)
    default = compiler.default_pipeline(poprt_lite.CompileOptions(**common))
    variants = {"unfused": {"skip_passes": [PASS]} if PASS in default else {}, "fused": {} if PASS in default else {"passes": [PASS]}}
    models = {}
    for variant, extra in variants.items():
        options = poprt_lite.CompileOptions(**common, **extra)
        out = folder / variant
        result = poprt_lite.compile(ctx.original, out / "model.onnx", output_dir=out, export_popef=True, options=options)
        models[variant] = poprt_lite.load_artifact(result.artifact).model_bytes
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="queries", choices=["seed", "queries"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ctx = workload_context(args.workload, (MODE,))
    config = ctx.config
    batch = ctx.plan(MODE)[0]
    feeds = ctx.artifact_feeder(MODE).feeds(batch)
    with tempfile.TemporaryDirectory() as tmp:
        models = compile_variants(ctx, Path(tmp))
    print(f"workload {args.workload}: {config.geometry.tag}, AttentionMask batch {config.batch_size}x{config.max_seq_len}, "
          f"first offline batch ({len(batch)} requests); {os.cpu_count()} CPUs, {args.threads} threads, {args.rounds} interleaved rounds")
    for variant, model in models.items():
        ops = collections.Counter(n.op_type for n in onnx.load_from_string(model).graph.node)
        print(f"  {variant:8s} nodes: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(10)))
    sessions = {v: create_session(m, args.threads, spinning=False) for v, m in models.items()}
    outputs = {v: s.run(None, feeds) for v, s in sessions.items()}  # warm-up
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(outputs["unfused"], outputs["fused"]))
    print(f"  largest |unfused - fused| over the outputs: {diff:.2e}")
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    for r in range(args.rounds):
        for variant in (list(models) if r % 2 == 0 else list(models)[::-1]):
            cpu0, start = own_cpu(), time.perf_counter()
            sessions[variant].run(None, feeds)
            wall[variant].append((time.perf_counter() - start) * 1e3)
            cpu[variant].append((own_cpu() - cpu0) * 1e3)
    print(f"\n  {'variant':8s} {'wall ms median (min-max)':>26s} {'CPU ms median (min-max)':>26s}")
    for variant in models:
        w, c = np.array(wall[variant]), np.array(cpu[variant])
        print(f"  {variant:8s} {np.median(w):10.1f} ({w.min():6.1f}-{w.max():6.1f}) {np.median(c):12.1f} ({c.min():6.1f}-{c.max():6.1f})")
    for name, times in (("wall", wall), ("CPU", cpu)):
        ratio = np.array(times["unfused"]) / np.array(times["fused"])
        print(f"  unfused/fused {name:4s}: median of per-round ratios {np.median(ratio):.3f} (range {ratio.min():.3f}-{ratio.max():.3f})")

if __name__ == "__main__":
    main()
