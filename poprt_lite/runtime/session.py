"""The one place poprt-lite builds onnxruntime sessions (runners, `--check`, passes, the bench).

Every session runs on the CPU provider with `ORT_ENABLE_ALL` and `threads` intra-op threads (0: one
per core), and with onnxruntime's `MatMulAddFusion` turned off. That fusion rewrites `MatMul` + `Add`
into `Gemm` (with a `Reshape` to 2-D on each side) wherever the shapes are static, which is every
model `--input_shape` compiles, and the Gemm form is slower there: onnxruntime's CPU Gemm first
copies the bias into every row of the `[M, N]` output (`GemmBroadcastBias`, an Eigen assignment
outside the thread pool, so on one thread) and then runs the product with beta=1 on top of it,
while `MatMul` + `Add` runs the product and adds the bias in parallel, or fuses it into `BiasGelu`
and `SkipLayerNormalization`. The serial copy weighs more the more threads share the product
(`benchmarks/matmul_add_fusion.py` measures it per batch and profiles it by op type). Dynamic-shape
models, which the fusion cannot touch, keep `MatMul` + `Add` anyway, so static and dynamic models
run the same kernels.

`spinning=False` stops onnxruntime's worker threads from busy-waiting after each run (the
PackRunner's default: between batches the cores belong to its serving and client threads).
"""

from __future__ import annotations

import os
from typing import Union

import onnx
import onnxruntime as ort

# onnxruntime graph transformers poprt-lite never wants (see the module docstring).
DISABLED_OPTIMIZERS: tuple[str, ...] = ("MatMulAddFusion",)
PROVIDERS = ["CPUExecutionProvider"]

ModelSource = Union[bytes, str, os.PathLike, onnx.ModelProto]


def session_options(
    threads: int = 0,
    *,
    spinning: bool = True,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.SessionOptions:
    """The options every poprt-lite session starts from."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.graph_optimization_level = level
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(
    model: ModelSource,
    threads: int = 0,
    *,
    spinning: bool = True,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for `model` (serialized bytes, a path or a ModelProto).

    `options` replaces the options built from `threads`, `spinning` and `level` (for settings this
    helper does not name, e.g. profiling); `disabled_optimizers` applies either way.
    """
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    if options is None:
        options = session_options(threads, spinning=spinning, level=level)
    return ort.InferenceSession(model, options, providers=PROVIDERS, disabled_optimizers=list(disabled_optimizers))
