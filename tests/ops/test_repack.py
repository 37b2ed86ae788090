import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poprt_lite import ops
from poprt_lite.errors import PoprtError

from .helpers import (
    DATA_DTYPES,
    layouts,
    model_of,
    one_node_model,
    random_array,
    run_ort,
    run_reference,
    session,
)

TRAILING = [(), (3,), (2, 3)]


def expected_packed(y, info, batch, seq):
    """Requests' real tokens one after another in the flat stream, then zeros."""
    real = [y[i, :n] for i, n in enumerate(info)]
    tokens = np.zeros((batch * seq, *y.shape[2:]), y.dtype)
    tokens[: int(info.sum())] = np.concatenate(real)
    return tokens.reshape(batch, seq, *y.shape[2:])


@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from(DATA_DTYPES), st.sampled_from(TRAILING), st.integers(0, 2**32 - 1))
def test_ort_matches_reference(layout, dtype, trailing, seed):
    batch, seq, size, info = layout
    # Padding slots of y hold non-zero garbage: Repack must ignore them.
    y = random_array(seed, (len(info), size, *trailing), dtype)
    packed_shape = np.array([batch, seq], np.int64)
    feeds = {"y": y, "unpack_info": info, "packed_shape": packed_shape}
    out = run_ort("Repack", feeds)
    assert out.dtype == y.dtype and out.shape == (batch, seq, *trailing)
    np.testing.assert_array_equal(out, ops.get_op("Repack").evaluate(y, info, packed_shape))
    np.testing.assert_array_equal(out, expected_packed(y, info, batch, seq))


ROUND_TRIP = {}


def round_trip_session(dtype, rank, slots, size):
    key = (dtype, rank, slots, size)
    if key not in ROUND_TRIP:
        nodes = [
            ops.make_node("Unpack", ["x", "unpack_info"], ["rows"], max_valid_num=slots,
                          segment_max_size=size),
            ops.make_node("Repack", ["rows", "unpack_info", "packed_shape"], ["out"]),
        ]
        x_dims = [f"x{i}" for i in range(rank)]
        inputs = [("x", dtype, x_dims), ("unpack_info", "int64", [slots]), ("packed_shape", "int64", [2])]
        ROUND_TRIP[key] = session(model_of(nodes, inputs, ["out"]))
    return ROUND_TRIP[key]


@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from(DATA_DTYPES), st.sampled_from(TRAILING), st.integers(0, 2**32 - 1))
def test_unpack_repack_round_trip(layout, dtype, trailing, seed):
    batch, seq, size, info = layout
    info = info.astype(np.int64)
    x = random_array(seed, (batch, seq, *trailing), dtype)
    sess = round_trip_session(dtype, x.ndim, len(info), size)
    out = sess.run(None, {"x": x, "unpack_info": info, "packed_shape": np.array([batch, seq])})[0]
    total = int(info.sum())
    flat_out, flat_x = out.reshape(-1, *trailing), x.reshape(-1, *trailing)
    np.testing.assert_array_equal(flat_out[:total], flat_x[:total])
    assert not flat_out[total:].any()


@pytest.mark.parametrize("info", [[4, 4, 1], [4, 4, 1, 0, 0], [0, 0, 0], [4, 4, 2], [3, 0, 2]])
def test_edge_layouts(info):
    """Spanning rows, exactly-L requests, unused slots, nothing packed, all packed, a 0 in between."""
    info = np.array(info, np.int32)
    y = random_array(1, (len(info), 4, 2), "float16")
    feeds = {"y": y, "unpack_info": info, "packed_shape": np.array([2, 5], np.int64)}
    np.testing.assert_array_equal(run_ort("Repack", feeds), expected_packed(y, info, 2, 5))


def test_hand_example():
    y = np.array([[1, 2, 3, -1], [4, 5, 6, 7], [8, 9, -1, -1], [-1, -1, -1, -1]], np.int64)
    feeds = {"y": y, "unpack_info": np.array([3, 4, 1, 0], np.int32),
             "packed_shape": np.array([2, 5], np.int64)}
    np.testing.assert_array_equal(run_ort("Repack", feeds), [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])


def test_reference_evaluator_runs_kernel_and_function_body():
    model = one_node_model(
        "Repack", [("y", "float32", ["N", "L", 2]), ("unpack_info", "int64", ["N"]),
                   ("packed_shape", "int64", [2])], {},
    )
    y = random_array(2, (3, 4, 2), "float32")
    feeds = {"y": y, "unpack_info": np.array([4, 3, 0]), "packed_shape": np.array([2, 4])}
    expected = expected_packed(y, feeds["unpack_info"], 2, 4)
    np.testing.assert_array_equal(run_reference(model, feeds)[0], expected)
    np.testing.assert_array_equal(run_reference(model, feeds, kernels=False)[0], expected)


def test_shape_inference_reads_constant_packed_shape():
    packed_shape = onnx.numpy_helper.from_array(np.array([16, 256], np.int64), "packed_shape")
    model = one_node_model(
        "Repack", [("y", "float16", [40, 256, 768]), ("unpack_info", "int32", [40])], {},
        initializers=[packed_shape],
    )
    assert onnx.helper.printable_type(model.graph.output[0].type) == "FLOAT16, 16x256x768"


def test_shape_inference_with_runtime_packed_shape():
    model = one_node_model(
        "Repack", [("y", "float16", [40, 256, 768]), ("unpack_info", "int32", [40]),
                   ("packed_shape", "int64", [2])], {},
    )
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 3 and dims[2].dim_value == 768
    assert not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value")


Y = np.zeros((3, 4, 2), np.float32)
INFO = np.array([4, 2, 0], np.int32)
SHAPE = np.array([2, 4], np.int64)


@pytest.mark.parametrize(
    "y, info, packed_shape, message",
    [
        (Y, INFO, SHAPE.astype(np.int32),
         "Repack: input 'packed_shape' must be a 1-D int64 tensor of length 2, got int32 of shape (2,)"),
        (Y, INFO, np.array([2, 4, 1]),
         "Repack: input 'packed_shape' must be a 1-D int64 tensor of length 2, got int64 of shape (3,)"),
        (Y[0, 0], INFO, SHAPE,
         "Repack: input 'y' must be a float32, float16, int32 or int64 tensor of rank >= 2, "
         "got float32 of shape (2,)"),
        (Y, INFO[:2], SHAPE,
         "Repack: input 'unpack_info' must have 3 elements (y.shape[0]), got 2"),
        (Y, INFO, np.array([0, 4]),
         "Repack: input 'packed_shape' must hold two positive sizes (B, S), got [0, 4]"),
        (Y, np.array([5, 0, 0]), SHAPE,
         "Repack: unpack_info[0]=5 exceeds y's row length 4"),
        (Y, np.array([4, 4, 1]), SHAPE,
         "Repack: unpack_info holds 9 tokens, more than the 8 token slots of packed_shape (2x4)"),
    ],
)
def test_validation_errors(y, info, packed_shape, message):
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("Repack", y, info, packed_shape)
    assert str(err.value) == message
