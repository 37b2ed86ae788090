"""The one place poprt-lite builds onnxruntime sessions (runners, `--check`, passes, the bench).

Every session runs on the CPU provider with `ORT_ENABLE_ALL` and `threads` intra-op threads (0: one
per core), and with two of onnxruntime's graph fusions turned off, each slower on the CPU than what
it replaces (`benchmarks/ort_fusions.py` times one batch of each bench model with the fusion on and
off, and profiles it by op type):

- `MatMulAddFusion` rewrites `MatMul` + `Add` into `Gemm` (with a `Reshape` to 2-D on each side)
  wherever the shapes are static, which is every model `--input_shape` compiles. onnxruntime's CPU
  Gemm first copies the bias into every row of the `[M, N]` output (`GemmBroadcastBias`, an Eigen
  assignment outside the thread pool, so on one thread) and then runs the product with beta=1 on
  top of it, while `MatMul` + `Add` runs the product and adds the bias in parallel, or fuses it
  into `BiasGelu`. The serial copy weighs more the more threads share the product.
- `SkipLayerNormFusion` rewrites the residual `Add` + `LayerNormalization` into
  `com.microsoft::SkipLayerNormalization`, whose CPU kernel costs about 3x the two ops it replaces
  (2 threads, MiniLM geometry: 25 ms per 16x128 batch against 6.6 ms of LayerNormalization plus the
  Adds; about 10% of the whole batch). Dynamic-shape exports mostly escape that fusion (it wants
  the two Add inputs' shapes to match), so they paid it less than the static models did.

With both off, static and dynamic models run the same kernels.

`spinning=False` stops onnxruntime's worker threads from busy-waiting after each run (the
PackRunner's default: between batches the cores belong to its serving and client threads).
"""

from __future__ import annotations

import os
from typing import Union

import onnx
import onnxruntime as ort

from poprt_lite.errors import option, whole_number
from poprt_lite.ir.artifact import WEIGHTS_MEMBER, Artifact

# onnxruntime graph transformers poprt-lite never wants (see the module docstring).
DISABLED_OPTIMIZERS: tuple[str, ...] = ("MatMulAddFusion", "SkipLayerNormFusion")
PROVIDERS = ["CPUExecutionProvider"]

ModelSource = Union[bytes, str, os.PathLike, onnx.ModelProto]


def check_threads(threads: object) -> int:
    """`threads` if it is an intra-op thread count (a whole number >= 0, 0: one per core), else a
    one-line PoprtError; callers that do work before making a session check it first too."""
    return whole_number(threads, 0, option("threads"), " (0: one per core)")


def session_options(
    threads: int = 0,
    *,
    spinning: bool = True,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.SessionOptions:
    """The options every poprt-lite session starts from."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = check_threads(threads)
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


def artifact_session(artifact: Artifact, threads: int = 0, *, spinning: bool = True) -> ort.InferenceSession:
    """A session of `artifact`'s model, given its weights from the artifact's mapping (a model over
    protobuf's 2 GB limit keeps them in the weights member)."""
    options = session_options(threads, spinning=spinning)
    if artifact.weights is not None:
        options.add_external_initializers_from_files_in_memory([WEIGHTS_MEMBER], [artifact.weights], [artifact.weights.nbytes])
    return create_session(artifact.model_bytes, options=options)
