"""Numerical checks of a converted model against its source on onnxruntime (`--check`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from poprt_lite import ir

DEFAULT_DYNAMIC = {0: 2, 1: 16}  # batch 2, sequence 16 where a dim is not fixed


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a BERT-like model: one padded batch with real-looking token ids, masks and positions.

    Row b holds a request of length S - b (at least 1); position ids restart per row.
    """
    rng = np.random.default_rng(seed)
    meta = ir.get_metadata(model)
    vocab = int(meta.get("vocab_size", 100))
    offset = int(meta.get("position_offset", 0))
    feeds = {}
    shapes = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else DEFAULT_DYNAMIC.get(i, 2) for i, d in enumerate(value.type.tensor_type.shape.dim)]
        shapes[value.name] = dims
    batch, seq = next(iter(shapes.values()))[:2]
    lengths = np.maximum(seq - np.arange(batch), 1)
    real = np.arange(seq)[None, :] < lengths[:, None]
    for value in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = shapes[value.name]
        name = value.name
        if "mask" in name:
            data = real.astype(dtype)
        elif "position" in name:
            data = np.where(real, np.arange(seq)[None, :] + offset, 0)
        elif "token_type" in name:
            data = rng.integers(0, 2, shape) * real
        elif np.issubdtype(dtype, np.integer):
            # Token ids >= 3 avoid the special ids (padding 0 or 1) that change RoBERTa's positions.
            data = np.where(real, rng.integers(3, vocab, shape), 0)
        else:
            data = rng.standard_normal(shape)
        feeds[name] = np.asarray(data, dtype=dtype).reshape(shape)
    return feeds


def max_abs_diff(source: onnx.ModelProto, converted: onnx.ModelProto, seed: int = 0) -> dict[str, float]:
    """Run both models on the converted model's feeds (the source gets those it takes) and return the
    largest absolute difference per output over the real tokens."""
    feeds = random_feeds(converted, seed)
    source_inputs = {v.name for v in source.graph.input}
    expected = session(source).run(None, {k: v for k, v in feeds.items() if k in source_inputs})
    actual = session(converted).run(None, feeds)
    mask = next((v for k, v in feeds.items() if "mask" in k), None)
    diffs = {}
    for value, want, got in zip(converted.graph.output, expected, actual):
        delta = np.abs(want.astype(np.float64) - got.astype(np.float64))
        if mask is not None and delta.shape[:2] == mask.shape:
            delta = delta[mask.astype(bool)]
        diffs[value.name] = float(delta.max()) if delta.size else 0.0
    return diffs
