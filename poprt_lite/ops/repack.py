"""Repack: one row per request [N,L,...] -> packed token stream [B,S,...] (inverse of Unpack)."""

import numpy as np

from poprt_lite.errors import PoprtError
from poprt_lite.ops.base import (
    TOKEN_GRID_BODY,
    CustomOp,
    ReferenceKernel,
    TensorSpec,
    check_unpack_info,
    input_dims,
    tensor_type,
)
from poprt_lite.vocab import UNPACK_INFO

DOC = """Repack per-request rows y[N,L,...] into packed rows out[B,S,...], the inverse of Unpack.

unpack_info[N] holds the request lengths (unused slots 0, after the used ones); request i's first
unpack_info[i] tokens go to the flat B*S token stream right after request i-1's, starting at flat
token 0. packed_shape[2] (int64) holds (B, S), usually a constant. Token slots not covered by any
request are zero.
"""

# The real tokens are the first total = sum(unpack_info) flat tokens. Token start[i] + j comes from
# row i*L + j of y viewed as [N*L, ...]: scattering the row numbers of the real (i, j) slots to their
# tokens inverts Unpack's map (padding slots go to distinct spare cells past `total`, so no index
# repeats). The gathered tokens are followed by zeros up to B*S (made from an empty slice padded
# with zeros, as CastLike needs opset 15).
BODY = (
    """
Repack (y, unpack_info, packed_shape) => (out) {
    zero = Constant <value_int: int = 0> ()
    one = Constant <value_int: int = 1> ()
    zero_1d = Constant <value_ints: ints = [0]> ()
    ax1 = Constant <value_ints: ints = [1]> ()
    minus_one = Constant <value_ints: ints = [-1]> ()
    lengths = Cast <to = 7> (unpack_info)
    starts = CumSum <exclusive = 1> (lengths, zero)
    total = ReduceSum <keepdims = 0> (lengths)
    y_shape = Shape (y)
    size = Gather (y_shape, one)"""
    + TOKEN_GRID_BODY
    + """
    grid_shape = Shape (real)
    num_rows = ReduceProd <keepdims = 0> (grid_shape)
    row = Range (zero, num_rows, one)
    row_grid = Reshape (row, grid_shape)
    spare = Add (row_grid, total)
    target_grid = Where (real, token, spare)
    target = Reshape (target_grid, minus_one)
    cells = Add (total, num_rows)
    cells_1d = Unsqueeze (cells, zero_1d)
    blank = Expand (zero, cells_1d)
    source_all = ScatterElements (blank, target, row)
    total_1d = Unsqueeze (total, zero_1d)
    source = Slice (source_all, zero_1d, total_1d)
    two = Constant <value_ints: ints = [2]> ()
    end = Constant <value_ints: ints = [9223372036854775807]> ()
    trailing = Slice (y_shape, two, end)
    rows_shape = Concat <axis = 0> (minus_one, trailing)
    rows = Reshape (y, rows_shape)
    picked = Gather (rows, source)
    num_tokens = ReduceProd <keepdims = 0> (packed_shape)
    missing = Sub (num_tokens, total)
    missing_1d = Unsqueeze (missing, zero_1d)
    flat = Flatten <axis = 2> (y)
    no_rows = Slice (flat, zero_1d, zero_1d, zero_1d)
    pads = Concat <axis = 0> (missing_1d, zero_1d, zero_1d, zero_1d)
    zeros_flat = Pad (no_rows, pads)
    zeros_shape = Concat <axis = 0> (missing_1d, trailing)
    zeros = Reshape (zeros_flat, zeros_shape)
    packed = Concat <axis = 0> (picked, zeros)
    out_shape = Concat <axis = 0> (packed_shape, trailing)
    out = Reshape (packed, out_shape)
}
"""
)


class Repack(ReferenceKernel):
    """numpy reference for Repack."""

    @staticmethod
    def compute(y, unpack_info, packed_shape):
        batch, seq = (int(v) for v in packed_shape)
        tokens = np.zeros((batch * seq, *y.shape[2:]), dtype=y.dtype)
        start = 0
        for i, length in enumerate(unpack_info):
            tokens[start : start + length] = y[i, :length]
            start += length
        return tokens.reshape(batch, seq, *y.shape[2:])


def _check(y, unpack_info, packed_shape):
    if len(unpack_info) != y.shape[0]:
        raise PoprtError(
            f"Repack: input '{UNPACK_INFO}' must have {y.shape[0]} elements (y.shape[0]), "
            f"got {len(unpack_info)}"
        )
    if (packed_shape < 1).any():
        raise PoprtError(
            f"Repack: input 'packed_shape' must hold two positive sizes (B, S), "
            f"got {packed_shape.tolist()}"
        )
    check_unpack_info(
        "Repack", unpack_info, y.shape[1], "y's row length", tuple(packed_shape), "packed_shape"
    )


def _infer(types, attrs, data):
    dims = input_dims(types[0])
    packed = [None, None] if data[2] is None else [int(v) for v in data[2]]
    return tensor_type(types[0].tensor_type.elem_type, None if dims is None else [*packed, *dims[2:]])


OP = CustomOp(
    name="Repack",
    doc=DOC,
    inputs=[
        TensorSpec("y", "T", ("float32", "float16", "int32", "int64"), "request rows [N,L,...]",
                   min_rank=2),
        TensorSpec(UNPACK_INFO, "Tind", ("int32", "int64"), "request lengths [N]", rank=1),
        TensorSpec("packed_shape", "Tshape", ("int64",), "(B, S)", rank=1, length=2),
    ],
    output=TensorSpec("out", "T", ("float32", "float16", "int32", "int64"), "packed rows [B,S,...]"),
    attributes=[],
    reference=Repack,
    infer=_infer,
    body=BODY,
    check=_check,
)
