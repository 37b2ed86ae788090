"""Build one-op models and run them with onnxruntime and the onnx reference evaluator."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from poprt_lite import ops

ONNX_OPSET = 17
DATA_DTYPES = ["float32", "float16", "int32", "int64"]


def model_of(nodes, inputs, outputs, initializers=(), opset=ONNX_OPSET) -> onnx.ModelProto:
    """A model over `inputs` [(name, numpy dtype, shape)], with functions attached, shapes inferred."""
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), s)
            for n, d, s in inputs
        ],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ops.attach_functions(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def one_node_model(op_name, inputs, attrs, initializers=(), opset=ONNX_OPSET) -> onnx.ModelProto:
    """A model holding one `op_name` node that reads `inputs`, then `initializers`, writes 'out'."""
    names = [n for n, _, _ in inputs] + [t.name for t in initializers]
    node = ops.make_node(op_name, names, ["out"], **attrs)
    return model_of([node], inputs, ["out"], initializers, opset)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def _cached_session(op_name, inputs, attrs) -> ort.InferenceSession:
    return session(one_node_model(op_name, list(inputs), dict(attrs)))


def symbolic(feeds: dict[str, np.ndarray]):
    """(name, dtype, shape) per feed, every dim symbolic, so one session serves all shapes."""
    return tuple((n, a.dtype.name, tuple(f"{n}{i}" for i in range(a.ndim))) for n, a in feeds.items())


def run_ort(op_name, feeds: dict[str, np.ndarray], **attrs) -> np.ndarray:
    """Run a one-node model on onnxruntime; sessions are cached per dtypes, ranks and attributes."""
    return _cached_session(op_name, symbolic(feeds), tuple(sorted(attrs.items()))).run(None, feeds)[0]


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray], kernels=True):
    """Run `model` on the onnx reference evaluator, with the numpy kernels or the function bodies."""
    new_ops = ops.reference_ops() if kernels else None
    return ReferenceEvaluator(model, new_ops=new_ops).run(None, feeds)


@st.composite
def layouts(draw, max_batch=3, max_seq=6, max_size=6, max_slots=5):
    """(B, S, L, unpack_info): used slots (1..L tokens each, fitting B*S) first, then 0-length ones."""
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_seq))
    size = draw(st.integers(1, max_size))
    slots = draw(st.integers(1, max_slots))
    lengths, free = [], batch * seq
    while len(lengths) < slots and free > 0 and draw(st.booleans()):
        lengths.append(draw(st.integers(1, min(size, free))))
        free -= lengths[-1]
    info = np.zeros(slots, dtype=draw(st.sampled_from(["int32", "int64"])))
    info[: len(lengths)] = lengths
    return batch, seq, size, info


def random_array(seed: int, shape, dtype) -> np.ndarray:
    """Non-zero integers in [-999, 999] (exact in float16), so moved or dropped tokens show."""
    rng = np.random.default_rng(seed)
    return (rng.integers(1, 1000, size=shape) * rng.choice([-1, 1], size=shape)).astype(dtype)
