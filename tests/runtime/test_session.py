"""runtime/session.py: the one builder of onnxruntime sessions keeps MatMul + Add out of Gemm and
Add + LayerNormalization out of SkipLayerNormalization."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import poprt_lite
from poprt_lite.runtime.session import create_session, session_options


def dense_model() -> onnx.ModelProto:
    """x[4, 6, 8] @ W[8, 16] + b: static shapes, the form MatMulAddFusion turns into Gemm."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6, 16])],
        [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimized_ops(tmp_path: Path, make) -> Counter:
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    make(options)
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_create_session_keeps_matmul_add(tmp_path):
    model = dense_model()
    plain = optimized_ops(tmp_path, lambda o: ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"]))
    assert plain["Gemm"] == 1 and plain["MatMul"] == 0  # what onnxruntime does by default
    ours = optimized_ops(tmp_path, lambda o: create_session(model, options=o))
    assert ours == Counter({"MatMul": 1, "Add": 1})
    x = np.random.default_rng(1).standard_normal((4, 6, 8)).astype(np.float32)
    w, b = (numpy_helper.to_array(i) for i in model.graph.initializer)
    np.testing.assert_allclose(create_session(model).run(None, {"x": x})[0], x @ w + b, rtol=1e-5, atol=1e-5)


def residual_layer_norm_model() -> onnx.ModelProto:
    """LayerNormalization(x + skip) over [2, 5, 8], static shapes: what SkipLayerNormFusion rewrites."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "skip"], ["s"]), helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)],
        "residual",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, 8]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
        [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), n) for n in ("gamma", "beta")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_create_session_keeps_add_layer_norm(tmp_path):
    model = residual_layer_norm_model()
    plain = optimized_ops(tmp_path, lambda o: ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"]))
    assert plain == Counter({"SkipLayerNormalization": 1})  # what onnxruntime does by default
    ours = optimized_ops(tmp_path, lambda o: create_session(model, options=o))
    assert ours == Counter({"Add": 1, "LayerNormalization": 1})
    rng = np.random.default_rng(3)
    x, skip = (rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(2))
    gamma, beta = (numpy_helper.to_array(i) for i in model.graph.initializer)
    s = x + skip
    expected = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-12) * gamma + beta
    np.testing.assert_allclose(create_session(model).run(None, {"x": x, "skip": skip})[0], expected, rtol=1e-4, atol=1e-5)


def test_create_session_options():
    options = session_options(3, spinning=False)
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # onnxruntime's default: spinning
        session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_no_other_module_builds_sessions():
    root = Path(poprt_lite.__file__).parent
    builders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"\bInferenceSession\(|\bSessionOptions\(", path.read_text())
    ]
    assert builders == ["runtime/session.py"]
