"""Which onnxruntime CPU kernel runs a MatMul with int8 weights and per-token int8 activations fastest.

One `x [M, K] @ W [K, N]` (MiniLM's shapes: K=384, N=1536 and K=1536, N=384), each way a one-node-
ish onnxruntime model with `--threads` intra-op threads and no spinning, run `--rounds` times
interleaved; the table gives the median CPU time of the process per run (CPU time, not wall: it
holds on a shared machine), the ratio to float32, the relative error against float64, and whether a
row's result is the same alone as in the batch (per-token independence):

- `float32 MatMul`: the reference;
- `MatMulInteger s8s8, per token`: QuantizeLinear per row (int8, zero point 0) -> MatMulInteger
  with int8 weights -> Cast -> Mul by the row scales -> Mul by the column scales;
- `MatMulInteger u8s8, per token`: the same with uint8 rows around 128 (the u8 x s8 path VNNI and
  AMX run);
- `MatMulIntegerToFloat, per token` (poprt-lite's quantize_int8): uint8 rows around 128 ->
  com.microsoft MatMulIntegerToFloat with the row scales `[M, 1]` as its A scale and the column
  scales as its B scale;
- `MatMulNBits 8-bit, accuracy_level 4, block B`: com.microsoft MatMulNBits with 8-bit weights in
  blocks of B along K, the activations quantized to int8 inside the kernel per row and block;
- `DynamicQuantizeMatMul, per tensor`: quantize_dynamic's kernel, one scale for the whole x (a row's
  result depends on the others: not usable for packing, the speed reference).

Run: python benchmarks/int8_kernels.py [--rows 4096 --rounds 15 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def model(k: int, n: int, nodes, initializers):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def per_token_rows(dtype) -> tuple[list, dict]:
    """x -> q (rows quantized per token, symmetric) and s [M, 1] (the row scales)."""
    zero = 128 if dtype == np.uint8 else 0
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["hi"], axes=[-1], keepdims=1),
        helper.make_node("ReduceMin", ["x"], ["lo"], axes=[-1], keepdims=1),
        helper.make_node("Neg", ["lo"], ["nlo"]),
        helper.make_node("Max", ["hi", "nlo", "tiny"], ["amax"]),
        helper.make_node("Div", ["amax", "levels"], ["s"]),
        helper.make_node("Reshape", ["s", "flat"], ["s1"]),
        helper.make_node("Shape", ["s1"], ["count"]),
        helper.make_node("ConstantOfShape", ["count"], ["zp"], value=numpy_helper.from_array(np.array([zero], dtype))),
        helper.make_node("QuantizeLinear", ["x", "s1", "zp"], ["q"], axis=0),
    ]
    return nodes, {"tiny": np.float32(1e-28), "levels": np.float32(127), "flat": np.array([-1], np.int64)}


def ways(weight: np.ndarray) -> dict:
    k, n = weight.shape
    column_scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    integers = np.clip(np.rint(weight / column_scale), -127, 127).astype(np.int8)
    found = {"float32 MatMul": model(k, n, [helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": weight})}
    for label, dtype in (("s8s8", np.int8), ("u8s8", np.uint8)):
        nodes, inits = per_token_rows(dtype)
        zero_point = ["azp"] if dtype == np.uint8 else []
        nodes += [
            helper.make_node("MatMulInteger", ["q", "wq", *zero_point], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["accf", "s"], ["rows"]),
            helper.make_node("Mul", ["rows", "ws"], ["y"]),
        ]
        zero_points = {"azp": np.uint8(128)} if zero_point else {}
        found[f"MatMulInteger {label}, per token"] = model(k, n, nodes, {**inits, "wq": integers, "ws": column_scale, **zero_points})
    nodes, inits = per_token_rows(np.uint8)
    nodes.append(helper.make_node("MatMulIntegerToFloat", ["q", "wq", "s", "ws", "azp"], ["y"], domain="com.microsoft"))
    found["MatMulIntegerToFloat, per token"] = model(k, n, nodes, {**inits, "wq": integers, "ws": column_scale, "azp": np.uint8(128)})
    for block in (32, 128):
        blocks = weight.reshape(k // block, block, n)
        scale = np.abs(blocks).max(axis=1) / 127  # [blocks, N]
        data = (np.clip(np.rint(blocks / scale[:, None, :]), -127, 127) + 128).astype(np.uint8).transpose(2, 0, 1)  # [N, blocks, block]
        node = helper.make_node("MatMulNBits", ["x", "b", "bs"], ["y"], domain="com.microsoft", K=k, N=n, bits=8, block_size=block, accuracy_level=4)
        found[f"MatMulNBits 8-bit, accuracy_level 4, block {block}"] = model(k, n, [node], {"b": np.ascontiguousarray(data), "bs": np.ascontiguousarray(scale.T).reshape(-1).astype(np.float32)})
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws"], ["y"], domain="com.microsoft")
    found["DynamicQuantizeMatMul, per tensor"] = model(k, n, [node], {"wq": integers, "ws": column_scale})
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="M: tokens in the batch")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; onnxruntime {ort.__version__}, {args.threads} threads")
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, n in ((384, 1536), (1536, 384)):
        weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        x = rng.standard_normal((args.rows, k)).astype(np.float32)
        x[:, 7] *= 20  # an outlier channel, as transformer activations have
        want = x.astype(np.float64) @ weight
        sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]) for name, m in ways(weight).items()}
        seconds = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                start = time.process_time()
                session.run(None, {"x": x})
                seconds[name].append(time.process_time() - start)
        base = np.median(seconds["float32 MatMul"])
        print(f"\nK={k} N={n} M={args.rows}")
        print(f"{'way':48s} {'CPU ms/run':>10s} {'x float32':>9s} {'rel. error':>10s} {'row alone = in batch':>21s}")
        for name, session in sessions.items():
            got = session.run(None, {"x": x})[0]
            alone = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(4)])
            same = float(np.abs(alone - got[:4]).max())
            error = float(np.abs(got - want).max() / np.abs(want).max())
            median = np.median(seconds[name])
            print(f"{name:48s} {median * 1e3:10.2f} {base / median:9.2f} {error:10.1e} {'yes' if same == 0 else f'no ({same:.1e})':>21s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
