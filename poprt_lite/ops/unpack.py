"""Unpack: packed token stream [B,S,...] -> one zero-padded row per request [N,L,...]."""

import numpy as np

from poprt_lite.errors import PoprtError
from poprt_lite.ops.base import (
    DYNAMIC_ROWS_DOC,
    ROW_LENGTH_BODY,
    TOKEN_GRID_BODY,
    ROW_SIZES,
    AttrSpec,
    CustomOp,
    ReferenceKernel,
    TensorSpec,
    check_slots,
    check_unpack_info,
    input_dims,
    row_length,
    tensor_type,
)
from poprt_lite.vocab import UNPACK_INFO

DOC = """Unpack packed rows x[B,S,...] into one row per request, out[N,L,...].

Requests lie one after another in the flattened B*S token stream: request 0 starts at flat token 0,
request i at the sum of the lengths before it, so a request may span rows. unpack_info[N] holds
the request lengths, unused slots (length 0) after the used ones. out[i] holds request i's tokens
followed by zeros. Attributes: max_valid_num (N), segment_max_size (L), and dynamic: with 1 the
rows follow the batch instead, one per unpack_info entry and as long as its longest request
(out[len(unpack_info), max(unpack_info), ...]; N and L then only bound them), for runtimes without
static shapes.

PopRT's signature is accepted too, as PopRT's packed DeBERTa script writes it: `unpack_info` int32
`[N, segment_num]` with the lengths in column 0 (segment_num 1) and `segment_max_size=[L]` as a
list. `ops.normalize_poprt_forms` rewrites the list into an int before the function body runs;
several segments per request (PopRT's `segment_max_size=[L1, L2]`) are refused.
"""

# Output slot (i, j) gathers flat token start[i] + j of x viewed as [B*S, ...]; slots past a
# request's length gather a zero row appended after the last token. (The zero row is an empty slice
# padded with zeros: CastLike, which would make a zero of x's type directly, needs opset 15.)
BODY = (
    """
Unpack <max_valid_num, segment_max_size, dynamic: int = 0> (x, unpack_info) => (out) {
    zero = Constant <value_int: int = 0> ()
    one = Constant <value_int: int = 1> ()
    zero_1d = Constant <value_ints: ints = [0]> ()
    ax1 = Constant <value_ints: ints = [1]> ()
    info = Cast <to = 7> (unpack_info)
    flat = Constant <value_ints: ints = [-1]> ()
    lengths = Reshape (info, flat)
    starts = CumSum <exclusive = 1> (lengths, zero)"""
    + ROW_LENGTH_BODY
    + TOKEN_GRID_BODY
    + """
    x_shape = Shape (x)
    two = Constant <value_ints: ints = [2]> ()
    end = Constant <value_ints: ints = [9223372036854775807]> ()
    trailing = Slice (x_shape, two, end)
    minus_one = Constant <value_ints: ints = [-1]> ()
    tokens_shape = Concat <axis = 0> (minus_one, trailing)
    tokens = Reshape (x, tokens_shape)
    x_rows = Flatten <axis = 2> (x)
    no_rows = Slice (x_rows, zero_1d, zero_1d, zero_1d)
    pads = Constant <value_ints: ints = [0, 0, 1, 0]> ()
    zero_flat = Pad (no_rows, pads)
    single = Constant <value_ints: ints = [1]> ()
    zero_shape = Concat <axis = 0> (single, trailing)
    zero_row = Reshape (zero_flat, zero_shape)
    padded = Concat <axis = 0> (tokens, zero_row)
    padded_shape = Shape (tokens)
    num_tokens = Gather (padded_shape, zero)
    source = Where (real, token, num_tokens)
    out = Gather (padded, source)
}
"""
)


class Unpack(ReferenceKernel):
    """numpy reference for Unpack."""

    @staticmethod
    def compute(x, unpack_info, *, max_valid_num, segment_max_size, dynamic):
        unpack_info = unpack_info.reshape(-1)
        tokens = x.reshape(-1, *x.shape[2:])
        size = row_length(unpack_info, segment_max_size, dynamic)
        out = np.zeros((len(unpack_info), size, *x.shape[2:]), dtype=x.dtype)
        start = 0
        for i, length in enumerate(unpack_info):
            out[i, :length] = tokens[start : start + length]
            start += length
        return out


def _check(x, unpack_info, *, max_valid_num, segment_max_size, dynamic):
    if unpack_info.ndim == 2 and unpack_info.shape[1] != 1:
        raise PoprtError(
            f"Unpack: input '{UNPACK_INFO}' of shape {list(unpack_info.shape)}: poprt-lite unpacks one segment per request "
            "([N] or PopRT's [N, 1])"
        )
    unpack_info = unpack_info.reshape(len(unpack_info), -1)[:, 0]
    check_slots("Unpack", unpack_info, max_valid_num, dynamic)
    check_unpack_info("Unpack", unpack_info, segment_max_size, "segment_max_size", x.shape[:2], "x")


def _poprt_form(attrs):
    """PopRT's `segment_max_size=[L]` (a list, one size per segment) -> `segment_max_size=L`."""
    sizes = attrs.get("segment_max_size")
    if isinstance(sizes, (list, tuple)):
        if len(sizes) != 1:
            raise PoprtError(
                f"Unpack: segment_max_size={list(sizes)} gives several segments per request (PopRT's multi-segment packing), "
                "which poprt-lite does not do; give one size"
            )
        attrs["segment_max_size"] = int(sizes[0])
    return attrs


def _infer(types, attrs, data):
    info = input_dims(types[1])
    if info is not None and len(info) == 2 and info[1].HasField("dim_value") and info[1].dim_value != 1:
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info]
        raise PoprtError(f"Unpack: input '{UNPACK_INFO}' of shape {shape}: poprt-lite unpacks one segment per request ([N] or PopRT's [N, 1])")
    dims = input_dims(types[0])
    if attrs["dynamic"]:
        slots = input_dims(types[1])
        rows = [slots[0] if slots else None, None]
    else:
        rows = [attrs["max_valid_num"], attrs["segment_max_size"]]
    out_dims = None if dims is None else [*rows, *dims[2:]]
    return tensor_type(types[0].tensor_type.elem_type, out_dims)


OP = CustomOp(
    name="Unpack",
    doc=DOC,
    inputs=[
        TensorSpec("x", "T", ("float32", "float16", "int32", "int64"), "packed rows [B,S,...]",
                   min_rank=2),
        TensorSpec(UNPACK_INFO, "Tind", ("int32", "int64"), "request lengths [N] (PopRT: [N, 1])", ranks=(1, 2)),
    ],
    output=TensorSpec("out", "T", ("float32", "float16", "int32", "int64"),
                      "one zero-padded row per request [N,L,...]"),
    attributes=[
        AttrSpec("max_valid_num", "N, the number of request slots", minimum=1),
        AttrSpec("segment_max_size", "L, the longest request", minimum=1),
        AttrSpec("dynamic", DYNAMIC_ROWS_DOC, default=0, choices=ROW_SIZES),
    ],
    reference=Unpack,
    infer=_infer,
    body=BODY,
    check=_check,
    poprt_form=_poprt_form,
)
