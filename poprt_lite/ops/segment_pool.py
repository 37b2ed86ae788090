"""SegmentPool: packed rows [B,S,H] + segment ids [B,S] -> one pooled row per request [N,H]."""

import numpy as np

from poprt_lite.errors import PoprtError
from poprt_lite.ops.base import AttrSpec, CustomOp, ReferenceKernel, TensorSpec, input_dims, tensor_type

MEAN, MAX, FIRST, MEAN_SQRT_LEN, WEIGHTED_MEAN, LAST = range(6)
MODES = {MEAN: "MEAN", MAX: "MAX", FIRST: "FIRST", MEAN_SQRT_LEN: "MEAN_SQRT_LEN", WEIGHTED_MEAN: "WEIGHTED_MEAN", LAST: "LAST"}

DOC = """Pool each request of packed rows x[B,S,H] into one row, out[N,H] (float32).

segment_ids[B,S] is AttentionMask mode's mask: in each row, the requests' tokens carry the ids
1, 2, ..., k in the order they lie in the row, each request's tokens one contiguous run, 0 on
padding. Slot order: out[n] is the n-th request in row-major order, i.e. row 0's requests by
segment id, then row 1's, and so on (the order of the requests' first tokens in the flattened
B*S stream). Slots past the last request are zero. Attribute mode: 0 (MEAN) the mean of the
request's tokens, 1 (MAX) their element-wise maximum, 2 (FIRST) its first token, 3 (MEAN_SQRT_LEN)
their sum over the square root of their number, 4 (WEIGHTED_MEAN) their mean weighted by position
(the request's token i, counted from 1, weighs i), 5 (LAST) its last token; max_valid_num (N).
The result is computed and returned in float32, the accumulation type sentence-transformers uses
for half-precision models (Cast it for a float16 graph).
"""

# Slot of a token: the number of requests in the rows before its row (an exclusive CumSum of each
# row's largest id) plus its id - 1; padding goes to slot N, which is no slot. A one-hot [T,N]
# comparison gives each slot's first token (ArgMax) and length (ReduceSum). Each request is then
# gathered as a window of the longest request's length [N,L,H], positions past its length
# repeating its first token (so they change neither the maximum nor, being weighted 0, the means).
# Every mode is computed and the attribute picks one: the body has no branches, and the pooling is
# small next to the encoder. Float constants are Casts of int ones: onnx-graphsurgeon turns a
# function's value_float Constant into a double tensor when it re-exports the model. TopK(k=1) takes the maximum: ReduceMax's axes moved from attribute to
# input at opset 18, and a body serves every opset from 13.
BODY = """
SegmentPool <max_valid_num, mode: int = 0> (x, segment_ids) => (out) {
    zero = Constant <value_int: int = 0> ()
    one = Constant <value_int: int = 1> ()
    two = Constant <value_int: int = 2> ()
    zero_1d = Constant <value_ints: ints = [0]> ()
    one_1d = Constant <value_ints: ints = [1]> ()
    two_1d = Constant <value_ints: ints = [2]> ()
    three_1d = Constant <value_ints: ints = [3]> ()
    three = Constant <value_int: int = 3> ()
    four = Constant <value_int: int = 4> ()
    five = Constant <value_int: int = 5> ()
    minus_one = Constant <value_ints: ints = [-1]> ()
    no_slot = Constant <value_int: int = @max_valid_num> ()
    ids = Cast <to = 7> (segment_ids)
    ids32 = Cast <to = 6> (segment_ids)
    top_at = ArgMax <axis = 1, keepdims = 1> (ids32)
    in_row_col = GatherElements <axis = 1> (ids, top_at)
    in_row = Squeeze (in_row_col, one_1d)
    row_first = CumSum <exclusive = 1> (in_row, zero)
    row_first_col = Unsqueeze (row_first, one_1d)
    slot_next = Add (ids, row_first_col)
    slot_real = Sub (slot_next, one)
    real = Greater (ids, zero)
    slot_grid = Where (real, slot_real, no_slot)
    slot = Reshape (slot_grid, minus_one)
    slot_col = Unsqueeze (slot, one_1d)
    slots = Range (zero, no_slot, one)
    hit = Equal (slot_col, slots)
    hit32 = Cast <to = 6> (hit)
    start = ArgMax <axis = 0, keepdims = 0> (hit32)
    hit64 = Cast <to = 7> (hit)
    count = ReduceSum <keepdims = 0> (hit64, zero_1d)
    count32 = Cast <to = 6> (count)
    longest_at = ArgMax <axis = 0, keepdims = 0> (count32)
    longest_raw = Gather (count, longest_at)
    longest = Max (longest_raw, one)
    position = Range (zero, longest, one)
    start_col = Unsqueeze (start, one_1d)
    count_col = Unsqueeze (count, one_1d)
    valid = Less (position, count_col)
    token_raw = Add (start_col, position)
    token = Where (valid, token_raw, start_col)
    xf = Cast <to = 1> (x)
    x_shape = Shape (x)
    hidden = Slice (x_shape, two_1d, three_1d)
    tokens_shape = Concat <axis = 0> (minus_one, hidden)
    tokens = Reshape (xf, tokens_shape)
    windows = Gather (tokens, token)
    valid_f = Cast <to = 1> (valid)
    weight = Unsqueeze (valid_f, two_1d)
    weighted = Mul (windows, weight)
    sums = ReduceSum <keepdims = 0> (weighted, one_1d)
    count_f = Cast <to = 1> (count_col)
    one_f = Cast <to = 1> (one)
    divisor = Max (count_f, one_f)
    mean = Div (sums, divisor)
    divisor_sqrt = Sqrt (divisor)
    mean_sqrt_len = Div (sums, divisor_sqrt)
    from_one = Add (position, one)
    weight_int = Where (valid, from_one, zero)
    weight_f = Cast <to = 1> (weight_int)
    weight_sum = ReduceSum <keepdims = 1> (weight_f, one_1d)
    weight_divisor = Max (weight_sum, one_f)
    token_weight = Unsqueeze (weight_f, two_1d)
    weighted_windows = Mul (windows, token_weight)
    weighted_sums = ReduceSum <keepdims = 0> (weighted_windows, one_1d)
    weighted_mean = Div (weighted_sums, weight_divisor)
    top, top_index = TopK <axis = 1> (windows, one_1d)
    maxima = Squeeze (top, one_1d)
    firsts = Gather (tokens, start)
    end = Add (start, count)
    last_raw = Sub (end, one)
    last = Max (last_raw, zero)
    lasts = Gather (tokens, last)
    chosen = Constant <value_int: int = @mode> ()
    is_max = Equal (chosen, one)
    is_first = Equal (chosen, two)
    is_mean_sqrt_len = Equal (chosen, three)
    is_weighted_mean = Equal (chosen, four)
    is_last = Equal (chosen, five)
    not_last = Where (is_last, lasts, mean)
    not_weighted_mean = Where (is_weighted_mean, weighted_mean, not_last)
    not_mean_sqrt_len = Where (is_mean_sqrt_len, mean_sqrt_len, not_weighted_mean)
    not_max = Where (is_first, firsts, not_mean_sqrt_len)
    picked = Where (is_max, maxima, not_max)
    used = Greater (count_col, zero)
    zero_f = Cast <to = 1> (zero)
    out = Where (used, picked, zero_f)
}
"""


def slots_of(segment_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(row, token offsets) of each request, in slot order."""
    requests = []
    for row, ids in enumerate(np.asarray(segment_ids)):
        for segment in range(1, int(ids.max(initial=0)) + 1):
            requests.append((row, np.flatnonzero(ids == segment)))
    return requests


class SegmentPool(ReferenceKernel):
    """numpy reference for SegmentPool."""

    @staticmethod
    def compute(x, segment_ids, *, max_valid_num, mode):
        out = np.zeros((max_valid_num, x.shape[2]), np.float32)
        for slot, (row, offsets) in enumerate(slots_of(segment_ids)):
            out[slot] = POOLINGS[mode](x[row, offsets].astype(np.float32))
        return out


POOLINGS = {  # mode -> the pooling of one request's tokens [n, H]
    MEAN: lambda tokens: tokens.mean(0),
    MAX: lambda tokens: tokens.max(0),
    FIRST: lambda tokens: tokens[0],
    MEAN_SQRT_LEN: lambda tokens: tokens.sum(0) / np.sqrt(len(tokens)),
    WEIGHTED_MEAN: lambda tokens: np.arange(1, len(tokens) + 1, dtype=np.float32) @ tokens / (len(tokens) * (len(tokens) + 1) / 2),
    LAST: lambda tokens: tokens[-1],
}


def _check(x, segment_ids, *, max_valid_num, mode):
    if segment_ids.shape != x.shape[:2]:
        raise PoprtError(
            f"SegmentPool: input 'segment_ids' must have x's leading shape {list(x.shape[:2])}, "
            f"got {list(segment_ids.shape)}"
        )
    if (segment_ids < 0).any():
        raise PoprtError("SegmentPool: input 'segment_ids' has negative values")
    for row, ids in enumerate(segment_ids):
        runs = ids[np.flatnonzero(np.diff(ids, prepend=0) != 0)]
        runs = runs[runs != 0]
        if not np.array_equal(runs, np.arange(1, len(runs) + 1)):
            raise PoprtError(
                f"SegmentPool: row {row} of 'segment_ids' must number its requests 1, 2, ... in "
                f"order, each one contiguous run; got {ids.tolist()}"
            )
    count = len(slots_of(segment_ids))
    if count > max_valid_num:
        raise PoprtError(
            f"SegmentPool: 'segment_ids' holds {count} requests, more than max_valid_num={max_valid_num}"
        )


def _infer(types, attrs, data):
    dims = input_dims(types[0])
    return tensor_type(1, None if dims is None else [attrs["max_valid_num"], dims[2]])


OP = CustomOp(
    name="SegmentPool",
    doc=DOC,
    inputs=[
        TensorSpec("x", "T", ("float32", "float16"), "packed rows [B,S,H]", rank=3),
        TensorSpec("segment_ids", "Tind", ("int32", "int64"), "segment ids [B,S]; 0 = padding", rank=2),
    ],
    output=TensorSpec("out", "T2", ("float32",), "one row per request [N,H], float32"),
    attributes=[
        AttrSpec("max_valid_num", "N, the number of request slots", minimum=1),
        AttrSpec("mode", ", ".join(f"{k} ({v})" for k, v in MODES.items()), default=MEAN, choices=MODES),
    ],
    reference=SegmentPool,
    infer=_infer,
    body=BODY,
    check=_check,
)
