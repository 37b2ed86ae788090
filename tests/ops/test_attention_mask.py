import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from poprt_lite import ops
from poprt_lite.errors import PoprtError

from .helpers import model_of, one_node_model, run_ort, run_reference, session

DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16]


@st.composite
def segment_ids(draw):
    """[B,S] segment ids: each row packs requests 1, 2, ... one after another, then padding 0."""
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    mask = np.zeros((batch, seq), dtype=draw(st.sampled_from(["int32", "int64"])))
    for row in mask:
        lengths = draw(st.lists(st.integers(1, seq), max_size=seq))
        ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:seq]
        row[: len(ids)] = ids
    return mask


def expected_mask(mask):
    out = np.full((mask.shape[0], 1, mask.shape[1], mask.shape[1]), -10000.0)
    for b, row in enumerate(mask):
        for i, j in np.ndindex(len(row), len(row)):
            if row[i] == row[j] != 0:
                out[b, 0, i, j] = 0.0
    return out


@settings(max_examples=60, deadline=None)
@given(segment_ids(), st.sampled_from(DTYPES))
def test_ort_matches_reference(mask, dtype):
    out = run_ort("AttentionMask", {"mask": mask}, dtype=dtype)
    assert out.dtype == helper.tensor_dtype_to_np_dtype(dtype)
    np.testing.assert_array_equal(out, ops.get_op("AttentionMask").evaluate(mask, dtype=dtype))
    np.testing.assert_array_equal(out, expected_mask(mask))


def test_hand_example():
    mask = np.array([[1, 1, 2, 0]], np.int64)
    m = -10000.0
    expected = [[[[0, 0, m, m], [0, 0, m, m], [m, m, 0, m], [m, m, m, m]]]]
    np.testing.assert_array_equal(run_ort("AttentionMask", {"mask": mask}, dtype=TensorProto.FLOAT), expected)


def test_default_dtype_is_float32():
    node = helper.make_node("AttentionMask", ["mask"], ["out"], domain=ops.DOMAIN)  # no dtype
    model = model_of([node], [("mask", "int32", ["B", "S"])], ["out"])
    out = session(model).run(None, {"mask": np.array([[1, 0]], np.int32)})[0]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[[0, -10000], [-10000, -10000]]]])


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_over_masked_scores(dtype):
    """Real query rows attend only to their request; padding rows (uniform mask) give no NaN."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    nodes = [
        ops.make_node("AttentionMask", ["mask"], ["additive"], dtype=dtype),
        helper.make_node("Add", ["scores", "additive"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    inputs = [("mask", "int32", ["B", "S"]), ("scores", np_type, ["B", 1, "S", "S"])]
    model = model_of(nodes, inputs, ["probs", "additive"])
    mask = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    scores = np.random.default_rng(0).normal(0, 4, (2, 1, 8, 8)).astype(np_type)
    probs, additive = session(model).run(None, {"mask": mask, "scores": scores})
    probs = probs.astype(np.float64)
    assert not np.isnan(probs).any()
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-3)
    assert (additive[0, 0, 5:] == -10000).all() and (additive[1] == -10000).all()
    for request in (1, 2):
        rows = np.flatnonzero(mask[0] == request)
        inside = probs[0, 0][np.ix_(rows, rows)]
        expected = softmax(scores[0, 0][np.ix_(rows, rows)].astype(np.float64))
        np.testing.assert_allclose(inside, expected, rtol=1e-2, atol=1e-4)
        np.testing.assert_allclose(inside.sum(-1), 1, rtol=1e-3)


def test_reference_evaluator_runs_kernel_and_function_body():
    model = one_node_model("AttentionMask", [("mask", "int32", ["B", "S"])],
                           dict(dtype=TensorProto.FLOAT16))
    feeds = {"mask": np.array([[1, 1, 2, 2, 0], [1, 2, 3, 0, 0]], np.int32)}
    expected = expected_mask(feeds["mask"]).astype(np.float16)
    np.testing.assert_array_equal(run_reference(model, feeds)[0], expected)
    np.testing.assert_array_equal(run_reference(model, feeds, kernels=False)[0], expected)


def test_shape_inference():
    model = one_node_model("AttentionMask", [("mask", "int64", ["B", "S"])],
                           dict(dtype=TensorProto.FLOAT16))
    assert helper.printable_type(model.graph.output[0].type) == "FLOAT16, Bx1xSxS"


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros(4, np.int32),
         "AttentionMask: input 'mask' must be a 2-D int32 or int64 tensor, got int32 of shape (4,)"),
        (np.zeros((2, 3), np.float32),
         "AttentionMask: input 'mask' must be a 2-D int32 or int64 tensor, got float32 of shape (2, 3)"),
    ],
)
def test_validation_errors(mask, message):
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("AttentionMask", mask)
    assert str(err.value) == message


def test_bad_dtype_attribute():
    with pytest.raises(PoprtError) as err:
        ops.make_node("AttentionMask", ["mask"], ["out"], dtype=TensorProto.INT64)
    assert str(err.value) == "AttentionMask: attribute 'dtype' must be 1 (FLOAT) or 10 (FLOAT16), got 7"


def test_shape_inference_rejects_wrong_dtype():
    with pytest.raises(PoprtError) as err:
        one_node_model("AttentionMask", [("mask", "float32", ["B", "S"])], {})
    assert str(err.value) == (
        "AttentionMask: input 'mask' must be a 2-D int32 or int64 tensor, got float32 of shape ('B', 'S')"
    )


def test_checker_accepts_model():
    model = one_node_model("AttentionMask", [("mask", "int32", ["B", "S"])], {})
    onnx.checker.check_model(model, full_check=True)
