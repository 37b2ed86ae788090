"""onnxruntime session options on the benchmark's models: graph optimization level and spinning.

Compiles (or loads from the `poprt-lite bench` cache) the padded and AttentionMask artifacts of
BERT-base geometry (16 x 256, max_valid_num 40) and times one batch per setting, the settings
interleaved round by round so that all see the same machine. Prints the median model time per batch.

Run from the repository root: python benchmarks/session_options.py [--model M.onnx] [--rounds 5]
(default model: the benchmark's BERT-base export, made on first use; needs '.[export]').
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from poprt_lite.bench.export import cached_bert_qa, default_cache_dir
from poprt_lite.bench.models import prepare_artifacts
from poprt_lite.bench.workload import synthetic_lengths
from poprt_lite.runtime.session import create_session

BATCH, SEQ = 16, 256
LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "enable_basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(model_bytes: bytes, level: ort.GraphOptimizationLevel, spinning: bool, threads: int) -> ort.InferenceSession:
    return create_session(model_bytes, threads, spinning=spinning, level=level)


def feeds(kind: str, names: list[str], vocab: int) -> dict[str, np.ndarray]:
    """One batch of the benchmark's first 16 requests: padded one per row, or two requests per row
    (128 + 128 tokens, segment ids 1 and 2) for AttentionMask."""
    rng = np.random.default_rng(0)
    if kind == "padded":
        lengths, _ = synthetic_lengths(BATCH, 128, SEQ)
        mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
        positions = np.tile(np.arange(SEQ), (BATCH, 1))
    else:
        mask = np.tile(np.repeat([1, 2], SEQ // 2), (BATCH, 1))
        positions = np.tile(np.r_[np.arange(SEQ // 2), np.arange(SEQ // 2)], (BATCH, 1))
    values = {
        "input_ids": rng.integers(4, vocab, (BATCH, SEQ)) * (mask > 0),
        "attention_mask": mask,
        "token_type_ids": np.zeros((BATCH, SEQ), np.int64),
        "position_ids": positions,
    }
    return {name: values[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="ONNX encoder (default: the benchmark's BERT-base export)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    model = args.model or cached_bert_qa()
    artifacts = prepare_artifacts(
        model, default_cache_dir(), batch_size=BATCH, seq_len=SEQ, max_valid_num=40, segment_max_size=SEQ,
        kinds=("padded", "attention_mask"),
    )
    runs = {}
    for kind, artifact in artifacts.items():
        vocab = int(artifact.manifest.get("vocab_size") or 1000)
        for level_name, level in LEVELS.items():
            for spinning in (True, False):
                s = session(artifact.model_bytes, level, spinning, args.threads)
                batch = feeds(kind, [i.name for i in s.get_inputs()], vocab)
                s.run(None, batch)  # warm-up
                runs[(kind, level_name, spinning)] = (s, batch, [])
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
