"""PaddingMask: additive key-padding mask for unpacked rows."""

import numpy as np
import onnx

from poprt_lite.ops.base import (
    DYNAMIC_ROWS_DOC,
    MASK_DTYPES,
    MASK_VALUE,
    ROW_LENGTH_BODY,
    ROW_SIZES,
    AttrSpec,
    CustomOp,
    ReferenceKernel,
    TensorSpec,
    check_unpack_info,
    input_dims,
    row_length,
    tensor_type,
)
from poprt_lite.vocab import UNPACK_INFO

DOC = """Additive padding mask [N,1,1,L] for the rows produced by Unpack, from unpack_info[N].

unpack_info[n] is the length of request n (0 for an unused slot; used slots come first).
out[n,0,0,j] is 0 for j < unpack_info[n] and -10000 otherwise. Attributes: segment_max_size (L),
dtype (FLOAT or FLOAT16 output), dynamic (1: L is the longest request max(unpack_info), for the
rows of a dynamic Unpack).
"""

BODY = (
    """
PaddingMask <segment_max_size, dtype: int = 1, dynamic: int = 0> (unpack_info) => (out) {
    lengths = Cast <to = 7> (unpack_info)
    ax123 = Constant <value_ints: ints = [1, 2, 3]> ()
    length = Unsqueeze (lengths, ax123)
    zero_i = Constant <value_int: int = 0> ()
    one_i = Constant <value_int: int = 1> ()"""
    + ROW_LENGTH_BODY
    + """
    position = Range (zero_i, size, one_i)
    real = Less (position, length)
    zero_f = Constant <value_float: float = 0.0> ()
    masked_f = Constant <value_float: float = -10000.0> ()
    zero = Cast <to: int = @dtype> (zero_f)
    masked = Cast <to: int = @dtype> (masked_f)
    out = Where (real, zero, masked)
}
"""
)


class PaddingMask(ReferenceKernel):
    """numpy reference for PaddingMask."""

    @staticmethod
    def compute(unpack_info, *, segment_max_size, dtype, dynamic):
        size = row_length(unpack_info, segment_max_size, dynamic)
        real = np.arange(size)[None, :] < unpack_info[:, None]
        out = np.where(real, 0.0, MASK_VALUE).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        return out[:, None, None, :]


def _check(unpack_info, *, segment_max_size, dtype, dynamic):
    check_unpack_info("PaddingMask", unpack_info, segment_max_size, "segment_max_size")


def _infer(types, attrs, data):
    dims = input_dims(types[0])
    n = None if dims is None else dims[0]
    return tensor_type(attrs["dtype"], [n, 1, 1, None if attrs["dynamic"] else attrs["segment_max_size"]])


OP = CustomOp(
    name="PaddingMask",
    doc=DOC,
    inputs=[TensorSpec(UNPACK_INFO, "Tind", ("int32", "int64"), "request lengths [N]", rank=1)],
    output=TensorSpec("out", "T2", ("float32", "float16"), "additive mask [N,1,1,L]"),
    attributes=[
        AttrSpec("segment_max_size", "L, the length of an unpacked row", minimum=1),
        AttrSpec("dtype", "output element type: 1 (FLOAT) or 10 (FLOAT16)",
                 default=onnx.TensorProto.FLOAT, choices=MASK_DTYPES),
        AttrSpec("dynamic", DYNAMIC_ROWS_DOC, default=0, choices=ROW_SIZES),
    ],
    reference=PaddingMask,
    infer=_infer,
    body=BODY,
    check=_check,
)
