"""onnxruntime's Softmax cost depends on the data: why a packed batch can be cheaper than a padded one.

Times one Softmax over [16, 12, 256, 256] attention scores (BERT-base heads, batch 16 x 256, the
benchmark's first 16 request lengths) with 2 intra-op threads:
- random scores, no masking;
- padded: the keys past each sequence's length masked (what a padded model computes: padding
  tokens still attend to the real ones);
- AttentionMask-like: padding query rows masked entirely as well;
- padded with other mask values, showing that cost comes from exp() of arguments below about -87
  (results that are denormal or underflow to zero), not from masking itself.

Run from the repository root: python benchmarks/softmax_masking.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from poprt_lite.bench.workload import synthetic_lengths

SHAPE = (16, 12, 256, 256)


def softmax_session(threads: int = 2) -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def milliseconds(session: ort.InferenceSession, x: np.ndarray, repeat: int = 5) -> float:
    session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(repeat):
        session.run(None, {"x": x})
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    session = softmax_session()
    lengths, _ = synthetic_lengths(SHAPE[0], 128, SHAPE[-1])
    scores = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    padding = np.arange(SHAPE[-1])[None, :] >= lengths[:, None]  # [batch, position]
    keys = np.broadcast_to(padding[:, None, None, :], SHAPE)
    queries = np.broadcast_to(padding[:, None, :, None], SHAPE)

    def masked(value: float, whole_query_rows: bool = False) -> np.ndarray:
        x = scores.copy()
        x[keys] = value
        if whole_query_rows:
            x[queries] = value
        return x

    rows = [
        ("random scores, no mask", scores),
        ("padded: padding keys masked (-10000)", masked(-10000.0)),
        ("AttentionMask-like: padding query rows masked too", masked(-10000.0, whole_query_rows=True)),
    ] + [(f"padded, mask value {v:g}", masked(v)) for v in (-3.4e38, -1000.0, -100.0, -87.0, -80.0, -30.0)]
    print(f"Softmax over {list(SHAPE)}, lengths {lengths.tolist()}")
    for label, x in rows:
        print(f"{label:52s} {milliseconds(session, x):7.1f} ms")


if __name__ == "__main__":
    main()
