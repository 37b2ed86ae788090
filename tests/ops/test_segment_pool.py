import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poprt_lite import ops
from poprt_lite.errors import PoprtError
from poprt_lite.ops.segment_pool import FIRST, LAST, MAX, MEAN, MEAN_SQRT_LEN, MODES, WEIGHTED_MEAN

from .helpers import one_node_model, run_ort, run_reference



@st.composite
def packed_rows(draw):
    """(segment ids [B,S], lengths in slot order): each row packs requests 1, 2, ... then padding."""
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    ids = np.zeros((batch, seq), dtype=draw(st.sampled_from(["int32", "int64"])))
    lengths = []
    for row in ids:
        used, segment = 0, 0
        while used < seq and draw(st.booleans()):
            n = draw(st.integers(1, seq - used))
            segment += 1
            row[used : used + n] = segment
            lengths.append(n)
            used += n
    return ids, lengths


def expected_pool(x, ids, slots, mode):
    """Independent of the kernel: walk the rows, cut each run of one id, pool it."""
    out = np.zeros((slots, x.shape[2]), np.float32)
    slot = 0
    for b in range(ids.shape[0]):
        for segment in range(1, int(ids[b].max(initial=0)) + 1):
            tokens = x[b][ids[b] == segment].astype(np.float64)
            n = len(tokens)
            out[slot] = {
                MEAN: tokens.mean(0), MAX: tokens.max(0), FIRST: tokens[0], MEAN_SQRT_LEN: tokens.sum(0) / n**0.5,
                WEIGHTED_MEAN: sum((i + 1) * t for i, t in enumerate(tokens)) / sum(range(1, n + 1)), LAST: tokens[-1],
            }[mode]
            slot += 1
    return out


@settings(max_examples=60, deadline=None)
@given(packed_rows(), st.sampled_from(list(MODES)), st.sampled_from(["float32", "float16"]), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_ort_matches_reference(layout, mode, dtype, spare, seed):
    ids, lengths = layout
    slots = len(lengths) + spare or 1
    x = np.random.default_rng(seed).standard_normal((*ids.shape, 3)).astype(dtype)
    out = run_ort("SegmentPool", {"x": x, "segment_ids": ids}, max_valid_num=slots, mode=mode)
    ref = ops.get_op("SegmentPool").evaluate(x, ids, max_valid_num=slots, mode=mode)
    assert out.dtype == np.float32 and out.shape == (slots, 3)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out, expected_pool(x, ids, slots, mode), atol=1e-6, rtol=0)
    assert not out[len(lengths):].any()


def test_hand_example():
    x = np.array([[[1], [2], [4], [8], [0]], [[3], [5], [7], [9], [11]]], np.float32)
    ids = np.array([[1, 1, 2, 2, 0], [1, 2, 2, 2, 2]], np.int64)
    results = {m: run_ort("SegmentPool", {"x": x, "segment_ids": ids}, max_valid_num=5, mode=m)[:, 0] for m in MODES}
    np.testing.assert_array_equal(results[MEAN], [1.5, 6, 3, 8, 0])
    np.testing.assert_array_equal(results[MAX], [2, 8, 3, 11, 0])
    np.testing.assert_array_equal(results[FIRST], [1, 4, 3, 5, 0])
    np.testing.assert_allclose(results[MEAN_SQRT_LEN], [3 / 2**0.5, 12 / 2**0.5, 3, 16, 0], rtol=1e-6)
    np.testing.assert_allclose(results[WEIGHTED_MEAN], [5 / 3, 20 / 3, 3, 9, 0], rtol=1e-6)
    np.testing.assert_array_equal(results[LAST], [2, 8, 3, 11, 0])


def test_negative_values_and_padding_between_requests():
    """The maximum of all-negative tokens is not 0 (padding never enters), gaps are skipped."""
    x = -np.arange(1, 9, dtype=np.float32).reshape(1, 8, 1)
    ids = np.array([[1, 1, 0, 2, 2, 2, 0, 0]], np.int32)
    out = run_ort("SegmentPool", {"x": x, "segment_ids": ids}, max_valid_num=2, mode=MAX)
    np.testing.assert_array_equal(out[:, 0], [-1, -4])


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("mode", MODES)
def test_function_body_on_reference_evaluator(opset, mode):
    x = np.random.default_rng(opset).standard_normal((2, 4, 3)).astype(np.float32)
    ids = np.array([[1, 2, 2, 0], [1, 1, 1, 1]], np.int64)
    model = one_node_model("SegmentPool", [("x", "float32", ["B", "S", 3]), ("segment_ids", "int64", ["B", "S"])],
                           dict(max_valid_num=4, mode=mode), opset=opset)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [4, 3]
    body = run_reference(model, {"x": x, "segment_ids": ids}, kernels=False)[0]
    kernel = run_reference(model, {"x": x, "segment_ids": ids}, kernels=True)[0]
    np.testing.assert_allclose(body, kernel, atol=1e-6)
    np.testing.assert_allclose(body, expected_pool(x, ids, 4, mode), atol=1e-6)


@pytest.mark.parametrize(
    "ids, slots, message",
    [
        ([[1, 1, 2]], 1, "SegmentPool: 'segment_ids' holds 2 requests, more than max_valid_num=1"),
        ([[1, 2, 1]], 4, "SegmentPool: row 0 of 'segment_ids' must number its requests 1, 2, ... in order, each one contiguous run; got [1, 2, 1]"),
        ([[2, 2, 0]], 4, "SegmentPool: row 0 of 'segment_ids' must number its requests 1, 2, ... in order, each one contiguous run; got [2, 2, 0]"),
        ([[1, -1, 0]], 4, "SegmentPool: input 'segment_ids' has negative values"),
        ([[1, 1]], 4, "SegmentPool: input 'segment_ids' must have x's leading shape [1, 3], got [1, 2]"),
    ],
)
def test_bad_segment_ids(ids, slots, message):
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("SegmentPool", np.zeros((1, 3, 2), np.float32), np.array(ids, np.int64), max_valid_num=slots)
    assert str(err.value) == message


def test_bad_mode_and_rank():
    with pytest.raises(PoprtError) as err:
        ops.make_node("SegmentPool", ["x", "ids"], ["y"], max_valid_num=2, mode=6)
    assert str(err.value) == (
        "SegmentPool: attribute 'mode' must be 0 (MEAN), 1 (MAX), 2 (FIRST), 3 (MEAN_SQRT_LEN), 4 (WEIGHTED_MEAN) or 5 (LAST), got 6"
    )
    with pytest.raises(PoprtError) as err:
        ops.validate_inputs("SegmentPool", np.zeros((2, 3), np.float32), np.ones((2, 3), np.int64), max_valid_num=2)
    assert str(err.value) == "SegmentPool: input 'x' must be a 3-D float32 or float16 tensor, got float32 of shape (2, 3)"
