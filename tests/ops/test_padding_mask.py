import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from poprt_lite import ops
from poprt_lite.errors import PoprtError

from .helpers import layouts, one_node_model, run_ort, run_reference


@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16]), st.sampled_from([0, 1]))
def test_ort_matches_reference(layout, dtype, dynamic):
    _, _, size, info = layout
    out = run_ort("PaddingMask", {"unpack_info": info}, segment_max_size=size, dtype=dtype, dynamic=dynamic)
    assert out.dtype == helper.tensor_dtype_to_np_dtype(dtype)
    assert out.shape == (len(info), 1, 1, int(info.max()) if dynamic else size)
    ref = ops.get_op("PaddingMask").evaluate(info, segment_max_size=size, dtype=dtype, dynamic=dynamic)
    np.testing.assert_array_equal(out, ref)
    for n, length in enumerate(info):
        assert not out[n, 0, 0, :length].any() and (out[n, 0, 0, length:] == -10000).all()


def test_hand_example():
    m = -10000.0
    out = run_ort("PaddingMask", {"unpack_info": np.array([3, 1, 0], np.int32)},
                  segment_max_size=3, dtype=TensorProto.FLOAT)
    np.testing.assert_array_equal(out[:, 0, 0], [[0, 0, 0], [0, m, m], [m, m, m]])
    assert out.shape == (3, 1, 1, 3)


def test_dynamic_hand_example():
    m = -10000.0
    out = run_ort("PaddingMask", {"unpack_info": np.array([2, 1], np.int32)},
                  segment_max_size=8, dtype=TensorProto.FLOAT, dynamic=1)
    np.testing.assert_array_equal(out[:, 0, 0], [[0, 0], [0, m]])


@pytest.mark.parametrize("dynamic", [0, 1])
def test_reference_evaluator_runs_kernel_and_function_body(dynamic):
    model = one_node_model("PaddingMask", [("unpack_info", "int64", ["N"])],
                           dict(segment_max_size=5, dtype=TensorProto.FLOAT16, dynamic=dynamic))
    feeds = {"unpack_info": np.array([4, 2, 0], np.int64)}
    expected = run_ort("PaddingMask", feeds, segment_max_size=5, dtype=TensorProto.FLOAT16, dynamic=dynamic)
    assert expected.shape[-1] == (4 if dynamic else 5)
    np.testing.assert_array_equal(run_reference(model, feeds)[0], expected)
    np.testing.assert_array_equal(run_reference(model, feeds, kernels=False)[0], expected)


def test_shape_inference():
    model = one_node_model("PaddingMask", [("unpack_info", "int32", [40])],
                           dict(segment_max_size=256, dtype=TensorProto.FLOAT16))
    assert helper.printable_type(model.graph.output[0].type) == "FLOAT16, 40x1x1x256"
    dynamic = one_node_model("PaddingMask", [("unpack_info", "int32", ["N"])],
                             dict(segment_max_size=256, dtype=TensorProto.FLOAT, dynamic=1))
    dims = dynamic.graph.output[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_value, dims[2].dim_value, dims[3].HasField("dim_value")) == ("N", 1, 1, False)


@pytest.mark.parametrize(
    "info, attrs, message",
    [
        (np.zeros((2, 2), np.int32), dict(segment_max_size=4),
         "PaddingMask: input 'unpack_info' must be a 1-D int32 or int64 tensor, got int32 of shape (2, 2)"),
        (np.zeros(2, np.uint8), dict(segment_max_size=4),
         "PaddingMask: input 'unpack_info' must be a 1-D int32 or int64 tensor, got uint8 of shape (2,)"),
        (np.array([5, 1]), dict(segment_max_size=4),
         "PaddingMask: unpack_info[0]=5 exceeds segment_max_size 4"),
        (np.array([1, 1]), dict(segment_max_size=4, dtype=TensorProto.DOUBLE),
         "PaddingMask: attribute 'dtype' must be 1 (FLOAT) or 10 (FLOAT16), got 11"),
        (np.array([1, 1]), dict(segment_max_size=4, axis=1),
         "PaddingMask: unknown attribute 'axis' (known: segment_max_size, dtype, dynamic)"),
    ],
)
def test_validation_errors(info, attrs, message):
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("PaddingMask", info, **attrs)
    assert str(err.value) == message
