import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poprt_lite import ops
from poprt_lite.errors import PoprtError

from .helpers import DATA_DTYPES, layouts, one_node_model, random_array, run_ort, run_reference

TRAILING = [(), (3,), (2, 3)]


def expected_rows(x, info, size):
    """Each request's tokens, cut from the flat token stream, then zeros (independent of the kernel)."""
    tokens = x.reshape(-1, *x.shape[2:])
    ends = np.cumsum(info)
    rows = np.zeros((len(info), size, *x.shape[2:]), x.dtype)
    for i, (end, length) in enumerate(zip(ends, info, strict=True)):
        rows[i, :length] = tokens[end - length : end]
    return rows


@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from(DATA_DTYPES), st.sampled_from(TRAILING), st.integers(0, 2**32 - 1), st.sampled_from([0, 1]))
def test_ort_matches_reference(layout, dtype, trailing, seed, dynamic):
    batch, seq, size, info = layout
    x = random_array(seed, (batch, seq, *trailing), dtype)
    attrs = dict(max_valid_num=len(info) + dynamic, segment_max_size=size, dynamic=dynamic)
    out = run_ort("Unpack", {"x": x, "unpack_info": info}, **attrs)
    ref = ops.get_op("Unpack").evaluate(x, info, **attrs)
    rows = int(info.max()) if dynamic else size  # dynamic: as long as the longest request
    assert out.dtype == x.dtype and out.shape == (len(info), rows, *trailing)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, expected_rows(x, info, rows))


@pytest.mark.parametrize(
    "info",
    [
        [4, 4, 1],  # request 1 spans rows 0-1; requests 0 and 1 are exactly L long; all slots used
        [4, 4, 1, 0, 0],  # unused slots after the used ones
        [0, 0, 0],  # nothing packed
        [4, 4, 2],  # every token of x belongs to a request
    ],
)
def test_edge_layouts(info):
    x = np.arange(1, 11, dtype=np.float16).reshape(2, 5, 1)
    info = np.array(info, np.int32)
    out = run_ort("Unpack", {"x": x, "unpack_info": info}, max_valid_num=len(info), segment_max_size=4)
    np.testing.assert_array_equal(out, expected_rows(x, info, 4))


def test_hand_example():
    x = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], np.int64)
    out = run_ort("Unpack", {"x": x, "unpack_info": np.array([3, 4, 2, 0], np.int32)},
                  max_valid_num=4, segment_max_size=4)
    np.testing.assert_array_equal(out, [[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0], [0, 0, 0, 0]])


def test_dynamic_rows_hand_example():
    x = np.array([[1, 2, 3, 4, 5, 6, 7]], np.int64)  # one stream of 7 tokens: requests of 3, 1, 2
    out = run_ort("Unpack", {"x": x, "unpack_info": np.array([3, 1, 2], np.int32)},
                  max_valid_num=8, segment_max_size=16, dynamic=1)
    np.testing.assert_array_equal(out, [[1, 2, 3], [4, 0, 0], [5, 6, 0]])


@pytest.mark.parametrize("dynamic, rows", [(0, 5), (1, 4)])
def test_reference_evaluator_runs_kernel_and_function_body(dynamic, rows):
    model = one_node_model(
        "Unpack", [("x", "float16", ["B", "S", 4]), ("unpack_info", "int32", [3])],
        dict(max_valid_num=3, segment_max_size=5, dynamic=dynamic),
    )
    feeds = {"x": random_array(0, (2, 4, 4), "float16"), "unpack_info": np.array([4, 3, 0], np.int32)}
    expected = expected_rows(feeds["x"], feeds["unpack_info"], rows)
    np.testing.assert_array_equal(run_reference(model, feeds)[0], expected)
    np.testing.assert_array_equal(run_reference(model, feeds, kernels=False)[0], expected)


@pytest.mark.parametrize(
    "x_shape, x_type, expected",
    [(["B", "S", 768], "float16", "FLOAT16, 40x256x768"), (["B", "S"], "int64", "INT64, 40x256")],
)
def test_shape_inference(x_shape, x_type, expected):
    model = one_node_model(
        "Unpack", [("x", x_type, x_shape), ("unpack_info", "int32", [40])],
        dict(max_valid_num=40, segment_max_size=256),
    )
    assert onnx.helper.printable_type(model.graph.output[0].type) == expected


def test_shape_inference_dynamic_rows():
    model = one_node_model(
        "Unpack", [("x", "float32", [1, "T", 768]), ("unpack_info", "int32", ["N"])],
        dict(max_valid_num=40, segment_max_size=256, dynamic=1),
    )
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].HasField("dim_value"), dims[2].dim_value) == ("N", False, 768)


def test_onnxruntime_folds_the_row_length_of_a_static_unpack(tmp_path):
    """The body's If on the `dynamic` attribute is folded away: a static Unpack keeps a constant L."""
    for dynamic in (0, 1):
        model = one_node_model(
            "Unpack", [("x", "float32", [2, 4, 3]), ("unpack_info", "int32", [3])],
            dict(max_valid_num=3, segment_max_size=4, dynamic=dynamic),
        )
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimized{dynamic}.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
        assert ("ReduceMax" in optimized) == bool(dynamic) and "If" not in optimized


X = np.zeros((2, 4, 3), np.float32)
INFO = np.array([4, 2, 0], np.int32)


@pytest.mark.parametrize(
    "x, info, attrs, message",
    [
        (X, np.zeros((3, 2), np.float32), dict(max_valid_num=3, segment_max_size=4),
         "Unpack: input 'unpack_info' must be a 1-D or 2-D int32 or int64 tensor, got float32 of shape (3, 2)"),
        (X, INFO.astype(np.float32), dict(max_valid_num=3, segment_max_size=4),
         "Unpack: input 'unpack_info' must be a 1-D or 2-D int32 or int64 tensor, got float32 of shape (3,)"),
        (np.zeros(8, np.float32), INFO, dict(max_valid_num=3, segment_max_size=4),
         "Unpack: input 'x' must be a float32, float16, int32 or int64 tensor of rank >= 2, "
         "got float32 of shape (8,)"),
        (X.astype(np.float64), INFO, dict(max_valid_num=3, segment_max_size=4),
         "Unpack: input 'x' must be a float32, float16, int32 or int64 tensor of rank >= 2, "
         "got float64 of shape (2, 4, 3)"),
        (X, INFO, dict(max_valid_num=4, segment_max_size=4),
         "Unpack: input 'unpack_info' must have max_valid_num=4 elements, got 3"),
        (X, INFO, dict(max_valid_num=2, segment_max_size=4, dynamic=1),
         "Unpack: input 'unpack_info' must have at most max_valid_num=2 elements, got 3"),
        (X, INFO, dict(max_valid_num=3, segment_max_size=4, dynamic=2),
         "Unpack: attribute 'dynamic' must be 0 (static) or 1 (dynamic), got 2"),
        (X, INFO, dict(max_valid_num=3, segment_max_size=3),
         "Unpack: unpack_info[0]=4 exceeds segment_max_size 3"),
        (X, np.array([4, -1, 0], np.int64), dict(max_valid_num=3, segment_max_size=4),
         "Unpack: unpack_info[1]=-1 is negative"),
        (X, np.array([4, 4, 1], np.int32), dict(max_valid_num=3, segment_max_size=4),
         "Unpack: unpack_info holds 9 tokens, more than the 8 token slots of x (2x4)"),
        (X, INFO, dict(max_valid_num=3),
         "Unpack: attribute 'segment_max_size' is required"),
        (X, INFO, dict(max_valid_num=0, segment_max_size=4),
         "Unpack: attribute 'max_valid_num' must be an integer >= 1, got 0"),
    ],
)
def test_validation_errors(x, info, attrs, message):
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("Unpack", x, info, **attrs)
    assert str(err.value) == message


def test_reference_evaluator_reports_bad_input():
    model = one_node_model(
        "Unpack", [("x", "float32", ["B", "S", 3]), ("unpack_info", "int32", ["N"])],
        dict(max_valid_num=3, segment_max_size=2),
    )
    with pytest.raises(PoprtError) as err:
        run_reference(model, {"x": X, "unpack_info": INFO})
    assert str(err.value) == "Unpack: unpack_info[0]=4 exceeds segment_max_size 2"


def test_shape_inference_rejects_wrong_rank():
    with pytest.raises(PoprtError) as err:
        one_node_model(
            "Unpack", [("x", "float32", ["B", "S", 3]), ("unpack_info", "int32", [3, 1, 1])],
            dict(max_valid_num=3, segment_max_size=4),
        )
    assert str(err.value) == (
        "Unpack: input 'unpack_info' must be a 1-D or 2-D int32 or int64 tensor, got int32 of shape (3, 1, 1)"
    )
