"""onnxruntime fusions poprt-lite turns off, on the benchmark's models: one batch per model, fusion on vs off.

poprt-lite's sessions (`poprt_lite/runtime/session.py`) turn `MatMulAddFusion` and
`SkipLayerNormFusion` off. This script shows why, one fusion at a time (`--fusion`; the other stays
off, as poprt-lite runs): for each model of a `poprt-lite bench` workload (the padded, unpack/repack and AttentionMask
artifacts, and the original dynamic-shape model as a control the fusion cannot touch) it times the
first batch the bench itself runs, with the fusion on (onnxruntime's default) and off, at several
intra-op thread counts. Within a thread count the models and settings run interleaved, round after
round (the order of on/off alternates), so that all see the same machine; it prints the median and
the range over the rounds of the wall time and of this process's CPU time per batch (sessions run
without spinning, so CPU time is work done: on a machine shared with other processes it moves far
less than wall time), and the medians of the per-round ratios on/off. It also counts the
optimized graph's nodes of the op types the fusion touches, and with `--profile` sums onnxruntime's own
per-node profile by op type for one model, on and off.

Run from the repository root (the models are exported / compiled on first use, like the bench's):
    python benchmarks/ort_fusions.py [--fusion MatMulAddFusion|SkipLayerNormFusion] [--workload seed|queries] [--threads 1,2] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import numpy as np
import onnx

from poprt_lite.bench.measure import workload_context
from poprt_lite.bench.monitor import own_cpu
from poprt_lite.bench.modes import Context
from poprt_lite.bench.models import KINDS, kind_name
from poprt_lite.bench.opcost import profile_by_op_type
from poprt_lite.bench.packer import plan_dynamic
from poprt_lite.runtime.session import DISABLED_OPTIMIZERS, create_session, session_options
from poprt_lite.vocab import PackMode

# The op types each fusion rewrites or produces, counted in the optimized graphs.
COUNTED_OPS = {
    "MatMulAddFusion": ("Gemm", "MatMul", "Add", "BiasGelu", "Gelu", "Reshape"),
    "SkipLayerNormFusion": ("SkipLayerNormalization", "LayerNormalization", "Add"),
}


def settings(fusion: str) -> dict[str, tuple[str, ...]]:
    """Disabled optimizers with the fusion on and off; "off" is poprt-lite's."""
    return {"on": tuple(o for o in DISABLED_OPTIMIZERS if o != fusion), "off": DISABLED_OPTIMIZERS}


def cases(ctx: Context) -> dict[str, tuple[bytes | str, dict[str, np.ndarray]]]:
    """Model name -> (model, feeds of the first batch the bench runs on it)."""
    out = {}
    for kind, artifact in ctx.artifacts.items():
        batch = ctx.plan(kind)[0]
        out[kind_name(kind)] = (artifact.model_bytes, ctx.artifact_feeder(kind).feeds(batch))
    session = create_session(ctx.original)
    batch = plan_dynamic(ctx.workload.lengths, ctx.config.batch_size, sort=True)[len(ctx.workload.lengths) // ctx.config.batch_size // 2]
    out["original (sorted batch)"] = (str(ctx.original), ctx.original_feeder(session).feeds(batch))
    return out


def optimized_ops(model, disabled: tuple[str, ...]) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options()
        options.log_severity_level = 3  # not the warning that the saved graph is hardware specific
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        create_session(model, options=options, disabled_optimizers=disabled)
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default=DISABLED_OPTIMIZERS[0], choices=DISABLED_OPTIMIZERS)
    parser.add_argument("--workload", default="seed", choices=["seed", "queries"])
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also profile the AttentionMask model by op type")
    args = parser.parse_args()
    ctx = workload_context(args.workload, KINDS)
    config = ctx.config
    models = cases(ctx)
    modes = settings(args.fusion)
    counted = COUNTED_OPS[args.fusion]
    print(f"{args.fusion}; workload {args.workload}: {config.geometry.tag}, batch {config.batch_size}x{config.max_seq_len}; "
          f"{os.cpu_count()} CPUs; {args.rounds} interleaved rounds per thread count")
    print("\noptimized graphs (ORT_ENABLE_ALL), " + " / ".join(counted) + " nodes:")
    for name, (model, _) in models.items():
        for setting, disabled in modes.items():
            ops = optimized_ops(model, disabled)
            print(f"  {name:24s} fusion {setting:3s}: " + " / ".join(str(ops[o]) for o in counted))
    print(f"\n{'threads':>7s}  {'model':24s} {'fusion on ms (min-max)':>24s} {'fusion off ms (min-max)':>24s} "
          f"{'on/off (range)':>18s} {'CPU ms on':>10s} {'CPU ms off':>10s} {'CPU on/off':>10s}")
    for threads in (int(t) for t in args.threads.split(",")):
        sessions = {
            (name, setting): create_session(model, threads, spinning=False, disabled_optimizers=disabled)
            for name, (model, _) in models.items() for setting, disabled in modes.items()
        }
        for (name, _), session in sessions.items():
            session.run(None, models[name][1])  # warm-up
        times, cpu = collections.defaultdict(list), collections.defaultdict(list)
        for r in range(args.rounds):
            for name, (_, feeds) in models.items():
                for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    cpu0, start = own_cpu(), time.perf_counter()
                    sessions[name, setting].run(None, feeds)
                    times[name, setting].append((time.perf_counter() - start) * 1e3)
                    cpu[name, setting].append((own_cpu() - cpu0) * 1e3)
        for name in models:
            on, off = np.array(times[name, "on"]), np.array(times[name, "off"])
            ratio = on / off
            cpu_on, cpu_off = np.array(cpu[name, "on"]), np.array(cpu[name, "off"])
            print(
                f"{threads:7d}  {name:24s} {np.median(on):9.1f} ({on.min():6.1f}-{on.max():6.1f}) "
                f"{np.median(off):9.1f} ({off.min():6.1f}-{off.max():6.1f}) {np.median(ratio):7.3f} ({ratio.min():.2f}-{ratio.max():.2f}) "
                f"{np.median(cpu_on):10.1f} {np.median(cpu_off):10.1f} {np.median(cpu_on / cpu_off):10.3f}"
            )
        del sessions
    if args.profile:
        name = kind_name(PackMode.attention_mask)
        model, feeds = models[name]
        threads = int(args.threads.split(",")[-1])
        result = {setting: profile_by_op_type(model, [feeds], threads, 3, disabled) for setting, disabled in modes.items()}
        ops = sorted(set(result["on"]) | set(result["off"]), key=lambda o: -max(result["on"].get(o, 0), result["off"].get(o, 0)))
        print(f"\nonnxruntime profile of the {name} model, {threads} threads, ms per batch by op type:")
        print(f"  {'op':28s} {'fusion on':>10s} {'fusion off':>10s}")
        for op in ops:
            print(f"  {op:28s} {result['on'].get(op, 0):10.1f} {result['off'].get(op, 0):10.1f}")
        print(f"  {'total':28s} {sum(result['on'].values()):10.1f} {sum(result['off'].values()):10.1f}")


if __name__ == "__main__":
    main()
