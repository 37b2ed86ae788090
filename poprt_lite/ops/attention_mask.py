"""AttentionMask: block-diagonal additive attention mask from per-token segment ids."""

import numpy as np
import onnx

from poprt_lite.errors import PoprtError
from poprt_lite.ops.base import (
    MASK_DTYPES,
    MASK_VALUE,
    AttrSpec,
    CustomOp,
    ReferenceKernel,
    TensorSpec,
    input_dims,
    tensor_type,
)

DOC = """Additive attention mask [B,1,S,S] for packed rows, from segment ids mask[B,S].

The host writes one segment id per token: 1, 2, 3, ... for the requests packed into a row, 0 for
padding. out[b,0,i,j] is 0 where mask[b,i] == mask[b,j] != 0 (query i and key j belong to the same
request) and -10000 elsewhere; a padding query row is all -10000, so a softmax over it is uniform,
never NaN. Attribute dtype selects FLOAT or FLOAT16 output.

PopRT's signature is accepted too: `AttentionMask(mask, scores)` with a string attribute
`dataType` ("FLOAT" or "FLOAT16"), as PopRT's packed DeBERTa script writes it; `scores` (the
attention scores the mask is added to) is not read. `ops.normalize_poprt_forms` rewrites such a
node into poprt-lite's form (dtype, no scores) before its function body runs.
"""

BODY = """
AttentionMask <dtype: int = 1> (mask) => (out) {
    ax13 = Constant <value_ints: ints = [1, 3]> ()
    ax12 = Constant <value_ints: ints = [1, 2]> ()
    query = Unsqueeze (mask, ax13)
    key = Unsqueeze (mask, ax12)
    same = Equal (query, key)
    real = Cast <to = 9> (query)
    keep = And (same, real)
    zero_f = Constant <value_float: float = 0.0> ()
    masked_f = Constant <value_float: float = -10000.0> ()
    zero = Cast <to: int = @dtype> (zero_f)
    masked = Cast <to: int = @dtype> (masked_f)
    out = Where (keep, zero, masked)
}
"""


class AttentionMask(ReferenceKernel):
    """numpy reference for AttentionMask."""

    @staticmethod
    def compute(mask, scores=None, *, dtype):
        query, key = mask[:, :, None], mask[:, None, :]
        keep = (query == key) & (query != 0)
        out = np.where(keep, 0.0, MASK_VALUE).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        return out[:, None]


def _poprt_form(attrs):
    """PopRT's `dataType="FLOAT16"` -> `dtype=10` (dataType decides: the reference evaluator fills
    in dtype's default next to it)."""
    data_type = attrs.pop("dataType", None)
    if data_type is not None:
        text = data_type.decode() if isinstance(data_type, bytes) else data_type
        by_name = {name: value for value, name in MASK_DTYPES.items()}
        if text not in by_name:
            raise PoprtError(f"AttentionMask: attribute 'dataType' must be {' or '.join(by_name)}, got {text!r}")
        attrs["dtype"] = by_name[text]
    return attrs


def _infer(types, attrs, data):
    dims = input_dims(types[0])
    out_dims = None if dims is None else [dims[0], 1, dims[1], dims[1]]
    return tensor_type(attrs["dtype"], out_dims)


OP = CustomOp(
    name="AttentionMask",
    doc=DOC,
    inputs=[
        TensorSpec("mask", "T", ("int32", "int64"), "segment ids [B,S]; 0 = padding", rank=2),
        TensorSpec("scores", "T2", ("float32", "float16"), "PopRT's signature: the attention scores (not read)", optional=True),
    ],
    output=TensorSpec("out", "T2", ("float32", "float16"), "additive mask [B,1,S,S]"),
    attributes=[
        AttrSpec("dtype", "output element type: 1 (FLOAT) or 10 (FLOAT16)",
                 default=onnx.TensorProto.FLOAT, choices=MASK_DTYPES),
        AttrSpec("dataType", "PopRT's signature: FLOAT or FLOAT16 (instead of dtype)", choices=MASK_DTYPES, string=True),
    ],
    reference=AttentionMask,
    infer=_infer,
    body=BODY,
    poprt_form=_poprt_form,
)
