"""onnxruntime session options on the benchmark's models: graph optimization level and spinning.

Compiles (or loads from the `poprt-lite bench` cache) the padded and AttentionMask artifacts of a
bench workload (default seed: BERT-base geometry, 16 x 256, max_valid_num 40) and times the first
batch the bench runs on each per setting, the settings interleaved round by round so that all see
the same machine. Prints the median model time per batch. Every setting keeps poprt-lite's
MatMulAddFusion and SkipLayerNormFusion off (benchmarks/ort_fusions.py measures those).

Run from the repository root: python benchmarks/session_options.py [--workload seed|queries] [--rounds 5]
(the bench's model, exported on first use; needs '.[export]').
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from poprt_lite.bench.measure import workload_context
from poprt_lite.bench.models import kind_name
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import PackMode

LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "enable_basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="seed", choices=["seed", "queries"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    ctx = workload_context(args.workload, (None, PackMode.attention_mask))
    artifacts = ctx.artifacts
    runs = {}
    for kind, artifact in artifacts.items():
        batch = ctx.artifact_feeder(kind).feeds(ctx.plan(kind)[0])  # the first batch the bench runs
        for level_name, level in LEVELS.items():
            for spinning in (True, False):
                s = create_session(artifact.model_bytes, args.threads, spinning=spinning, level=level)
                s.run(None, batch)  # warm-up
                runs[(kind_name(kind), level_name, spinning)] = (s, batch, [])
    for _ in range(args.rounds):
        for s, batch, times in runs.values():
            start = time.perf_counter()
            s.run(None, batch)
            times.append(time.perf_counter() - start)
    print(f"{'model':15s} {'optimization':13s} {'spinning':8s} {'ms/batch (median)':>18s}")
    for (kind, level_name, spinning), (_, _, times) in runs.items():
        print(f"{kind:15s} {level_name:13s} {str(spinning):8s} {np.median(times) * 1e3:18.0f}")


if __name__ == "__main__":
    main()
