"""The shared description of a poprt-lite custom op.

A `CustomOp` bundles, for one op of the ``ai.graphcore`` domain:

- its `onnx.defs.OpSchema` (built from `TensorSpec`/`AttrSpec` declarations), with a type and shape
  inference function, so `onnx.checker` and `onnx.shape_inference` accept and type the op;
- a numpy reference kernel (`ReferenceKernel` subclass) for `onnx.reference.ReferenceEvaluator`;
- an ONNX function body (text in the ONNX textual syntax) made of standard ONNX ops, attached to
  models as a model-local function so onnxruntime runs the op natively.

Function bodies read the node's attributes through attribute references (``@name``); both
onnxruntime and the onnx reference evaluator bind them when they inline the function, and function
attribute defaults (``<dtype: int = 1>``) cover attributes the node omits, so one body per op
serves every attribute set. The body is rendered for the model's ONNX opset (the checker requires
a function's ``""`` opset to match the model's) and uses only ops whose semantics are the same
from opset 13 on (no CastLike, no Shape start/end), hence `MIN_ONNX_OPSET`.

onnx shape inference uses a registered schema's inference function in preference to a model-local
function body, so the schemas' Python inference functions give the output types and shapes
(through the bodies alone onnx would lose Unpack's trailing dims and all of Repack's dims).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import onnx
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

from poprt_lite.errors import PoprtError
from poprt_lite.vocab import UNPACK_INFO

DOMAIN = "ai.graphcore"
OPSET_VERSION = 1
MIN_ONNX_OPSET = 13
# Additive mask value for masked positions: large enough to zero a softmax, finite in float16.
MASK_VALUE = -10000.0
MASK_DTYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "FLOAT16"}
# The `dynamic` attribute of Unpack and PaddingMask: rows of the compiled size, or of the batch's.
ROW_SIZES = {0: "static", 1: "dynamic"}
DYNAMIC_ROWS_DOC = (
    "0: rows of segment_max_size, max_valid_num of them (static); 1: one row per unpack_info "
    "entry (at most max_valid_num), as long as the longest request max(unpack_info) (dynamic)"
)
# The row length L in a function body: segment_max_size, or with `dynamic` the longest request.
# onnxruntime folds the If on the constant attribute when it inlines the body, so a static op keeps
# its constant L (and everything computed from it). Needs `lengths` (int64) in scope.
ROW_LENGTH_BODY = """
    dynamic_int = Constant <value_int: int = @dynamic> ()
    static_int = Constant <value_int: int = 0> ()
    is_dynamic = Greater (dynamic_int, static_int)
    size = If (is_dynamic) <then_branch = longest_row () => (int64 longest) {
        longest = ReduceMax <keepdims = 0> (lengths)
    }, else_branch = compiled_row () => (int64 compiled) {
        compiled = Constant <value_int: int = @segment_max_size> ()
    }>"""

# The token grid of [N, size] request rows in a function body: `token` [N, size] is the flat token
# slot of row i's j-th position (starts[i] + j) and `real` whether j is one of request i's tokens.
# Needs `zero`, `one`, `ax1`, `lengths`, `starts` and `size` in scope.
TOKEN_GRID_BODY = """
    position = Range (zero, size, one)
    length = Unsqueeze (lengths, ax1)
    real = Less (position, length)
    start = Unsqueeze (starts, ax1)
    token = Add (start, position)"""


def row_length(unpack_info: np.ndarray, segment_max_size: int, dynamic: int) -> int:
    """L of the rows Unpack and PaddingMask make (see ROW_LENGTH_BODY)."""
    if not dynamic:
        return segment_max_size
    return int(np.max(unpack_info, initial=0))


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _onnx_type_str(np_name: str) -> str:
    """'float32' -> 'tensor(float)', as used in schema type constraints."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np_name))
    return f"tensor({onnx.TensorProto.DataType.Name(elem).lower()})"


def _elem_type_name(elem_type: int) -> str:
    """numpy-style name of a defined onnx element type ('float32', 'int64', ...)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, schema type variable, allowed numpy dtypes, rank constraint."""

    name: str
    type_param: str
    dtypes: tuple[str, ...]
    doc: str
    rank: int | None = None
    min_rank: int = 0
    length: int | None = None
    optional: bool = False  # PopRT's signatures: an extra input poprt-lite's form leaves out
    ranks: tuple[int, ...] | None = None  # several allowed ranks (PopRT's signatures), instead of `rank`

    def expected(self) -> str:
        dtypes = _join(self.dtypes)
        if self.ranks is not None:
            text = f"a {_join([f'{r}-D' for r in self.ranks])} {dtypes} tensor"
        elif self.rank is None:
            text = f"a {dtypes} tensor of rank >= {self.min_rank}"
        else:
            text = f"a {self.rank}-D {dtypes} tensor"
        return text if self.length is None else f"{text} of length {self.length}"

    def check(self, op_name: str, dtype: str | None, shape: tuple | None) -> None:
        """Raise PoprtError unless `dtype`/`shape` fit; None means unknown (not checked)."""
        bad = dtype is not None and dtype not in self.dtypes
        if shape is not None:
            rank = len(shape)
            if self.ranks is not None:
                bad |= rank not in self.ranks
            else:
                bad |= rank < self.min_rank if self.rank is None else rank != self.rank
            bad |= (
                self.length is not None and rank == 1 and isinstance(shape[0], int)
                and shape[0] != self.length
            )
        if bad:
            where = "unknown shape" if shape is None else f"shape {shape}"
            raise PoprtError(
                f"{op_name}: input '{self.name}' must be {self.expected()}, "
                f"got {dtype or 'unknown dtype'} of {where}"
            )


@dataclass(frozen=True)
class AttrSpec:
    """An int attribute: required when `default` is None; `choices` maps allowed values to names.

    `string=True`: a string attribute from PopRT's signatures, optional (None when absent), one of
    `choices`' names."""

    name: str
    doc: str
    default: int | None = None
    minimum: int | None = None
    choices: dict[int, str] | None = None
    string: bool = False

    def schema_attribute(self) -> OpSchema.Attribute:
        if self.string:
            return OpSchema.Attribute(self.name, OpSchema.AttrType.STRING, self.doc, required=False)
        if self.default is None:
            return OpSchema.Attribute(self.name, OpSchema.AttrType.INT, self.doc, required=True)
        return OpSchema.Attribute(
            self.name, onnx.helper.make_attribute(self.name, self.default), self.doc
        )

    def resolve(self, op_name: str, value: Any) -> int | str | None:
        """The attribute's value (default when None), checked."""
        if self.string:
            text = value.decode() if isinstance(value, bytes) else value
            if text is not None and text not in (self.choices or {}).values():
                allowed = _join(list((self.choices or {}).values()))
                raise PoprtError(f"{op_name}: attribute '{self.name}' must be {allowed}, got {text!r}")
            return text
        if value is None:
            if self.default is None:
                raise PoprtError(f"{op_name}: attribute '{self.name}' is required")
            return self.default
        if self.choices is not None and value not in self.choices:
            allowed = _join([f"{k} ({v})" for k, v in self.choices.items()])
            raise PoprtError(f"{op_name}: attribute '{self.name}' must be {allowed}, got {value}")
        if self.minimum is not None and (not isinstance(value, int) or value < self.minimum):
            raise PoprtError(
                f"{op_name}: attribute '{self.name}' must be an integer >= {self.minimum}, "
                f"got {value!r}"
            )
        return int(value)


class ReferenceKernel(OpRun):
    """numpy reference kernel; subclasses are named after their op and implement `compute`."""

    op_domain = DOMAIN
    op: ClassVar[CustomOp]
    op_schema: ClassVar[OpSchema]

    def _run(self, *inputs, **attrs):
        return (self.op.evaluate(*inputs, **attrs),)

    @staticmethod
    @abc.abstractmethod
    def compute(*inputs: np.ndarray, **attrs: int) -> np.ndarray:
        """The op's output for validated inputs and resolved attributes."""


# (input types, resolved attributes, constant input values or None) -> output type
InferFn = Callable[[list[onnx.TypeProto], dict[str, int], list[Any]], onnx.TypeProto]
# (input arrays, resolved attributes) -> None; raises PoprtError on bad values
CheckFn = Callable[..., None]


def tensor_type(elem_type: int, dims: Sequence[onnx.TensorShapeProto.Dimension | int | None] | None):
    """A TypeProto; dims may be Dimension protos, ints or None (unknown); dims=None: unknown rank."""
    out = onnx.TypeProto()
    out.tensor_type.elem_type = elem_type
    if dims is not None:
        shape = out.tensor_type.shape
        shape.SetInParent()
        for d in dims:
            new = shape.dim.add()
            if isinstance(d, onnx.TensorShapeProto.Dimension):
                new.CopyFrom(d)
            elif d is not None:
                new.dim_value = d
    return out


def input_dims(t: onnx.TypeProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    """The dims of a tensor type, or None when its rank is unknown."""
    if not t.tensor_type.HasField("shape"):
        return None
    return list(t.tensor_type.shape.dim)


def _shape_of_type(t: onnx.TypeProto) -> tuple | None:
    dims = input_dims(t)
    if dims is None:
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


class CustomOp:
    """One custom op of the ai.graphcore domain (see the module docstring)."""

    def __init__(
        self,
        name: str,
        doc: str,
        inputs: Sequence[TensorSpec],
        output: TensorSpec,
        attributes: Sequence[AttrSpec],
        reference: type[ReferenceKernel],
        infer: InferFn,
        body: str,
        check: CheckFn | None = None,
        poprt_form: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        if reference.__name__ != name:
            raise ValueError(f"reference kernel {reference.__name__} must be named {name}")
        self.name = name
        self.domain = DOMAIN
        self.version = OPSET_VERSION
        self.doc = doc.strip().splitlines()[0]
        self.inputs = tuple(inputs)
        self.output = output
        self.attributes = {a.name: a for a in attributes}
        self._infer = infer
        self._body = body
        self._check = check
        self._poprt_form = poprt_form
        self.schema = self._make_schema(doc)
        self.reference = reference
        reference.op = self
        reference.op_schema = self.schema

    def __repr__(self) -> str:
        return f"CustomOp({self.domain}::{self.name} v{self.version})"

    def _make_schema(self, doc: str) -> OpSchema:
        constraints: dict[str, tuple[str, ...]] = {}
        for spec in (*self.inputs, self.output):
            constraints.setdefault(spec.type_param, spec.dtypes)
            if constraints[spec.type_param] != spec.dtypes:
                raise ValueError(f"{self.name}: type variable {spec.type_param} used inconsistently")
        schema = OpSchema(
            self.name,
            DOMAIN,
            OPSET_VERSION,
            doc,
            inputs=[
                OpSchema.FormalParameter(
                    s.name, s.type_param, s.doc,
                    param_option=OpSchema.FormalParameterOption.Optional if s.optional else OpSchema.FormalParameterOption.Single,
                )
                for s in self.inputs
            ],
            outputs=[OpSchema.FormalParameter(self.output.name, self.output.type_param, self.output.doc)],
            type_constraints=[
                (param, [_onnx_type_str(d) for d in dtypes], "") for param, dtypes in constraints.items()
            ],
            attributes=[a.schema_attribute() for a in self.attributes.values()],
        )
        schema.set_type_and_shape_inference_function(self._infer_node)
        return schema

    def canonical_attributes(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """`attrs` in poprt-lite's form: PopRT's spellings (poprt_form) rewritten."""
        return self._poprt_form(dict(attrs)) if self._poprt_form is not None else dict(attrs)

    def normalize(self, node: onnx.NodeProto) -> bool:
        """Rewrite a node written in PopRT's signature into poprt-lite's in place (attributes as
        `canonical_attributes` says, optional inputs dropped); whether anything changed."""
        given = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        canonical = self.canonical_attributes(given)
        required = sum(not spec.optional for spec in self.inputs)
        if canonical == given and len(node.input) <= required:
            return False
        del node.attribute[:]
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in canonical.items() if v is not None)
        del node.input[required:]
        return True

    def resolve_attributes(self, attrs: dict[str, Any]) -> dict[str, int]:
        """Checked attribute values with defaults filled in; PoprtError for unknown names."""
        attrs = self.canonical_attributes(attrs)
        unknown = sorted(set(attrs) - set(self.attributes))
        if unknown:
            raise PoprtError(
                f"{self.name}: unknown attribute '{unknown[0]}' "
                f"(known: {', '.join(self.attributes)})"
            )
        resolved = {n: a.resolve(self.name, attrs.get(n)) for n, a in self.attributes.items()}
        return {n: v for n, v in resolved.items() if v is not None}

    def _check_input_count(self, count: int) -> None:
        required = sum(not spec.optional for spec in self.inputs)
        if not required <= count <= len(self.inputs):
            names = ", ".join(s.name for s in self.inputs[:required])
            raise PoprtError(f"{self.name}: expected {required} inputs ({names}), got {count}")

    def _validated(self, arrays: Sequence[Any], attrs: dict[str, Any]):
        self._check_input_count(len(arrays))
        resolved = self.resolve_attributes(attrs)
        arrays = tuple(np.asarray(a) for a in arrays)
        for spec, array in zip(self.inputs, arrays):
            spec.check(self.name, array.dtype.name, array.shape)
        if self._check is not None:
            self._check(*arrays, **resolved)
        return arrays, resolved

    def validate(self, *arrays: np.ndarray, **attrs: Any) -> dict[str, int]:
        """Check input arrays and attributes (PoprtError); return the resolved attributes."""
        return self._validated(arrays, attrs)[1]

    def evaluate(self, *arrays: np.ndarray, **attrs: Any) -> np.ndarray:
        """The reference kernel's output for `arrays`, validated first."""
        arrays, resolved = self._validated(arrays, attrs)
        return self.reference.compute(*arrays, **resolved)

    def _infer_node(self, ctx) -> None:
        attrs = {}
        for name in self.attributes:
            proto = ctx.get_attribute(name)
            if proto is not None:
                attrs[name] = onnx.helper.get_attribute_value(proto)
        resolved = self.resolve_attributes(attrs)
        self._check_input_count(ctx.get_num_inputs())
        types, data = [], []
        for i, spec in enumerate(self.inputs[: ctx.get_num_inputs()]):
            t = ctx.get_input_type(i)
            t = onnx.TypeProto() if t is None else t
            elem = t.tensor_type.elem_type
            spec.check(self.name, _elem_type_name(elem) if elem else None, _shape_of_type(t))
            types.append(t)
            value = ctx.get_input_data(i)
            data.append(onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else None)
        ctx.set_output_type(0, self._infer(types, resolved, data))

    def function(self, opset: int = MIN_ONNX_OPSET) -> onnx.FunctionProto:
        """The op's function body for a model importing ONNX opset `opset` (>= MIN_ONNX_OPSET)."""
        if opset < MIN_ONNX_OPSET:
            raise PoprtError(
                f"{self.name}: the function body needs ONNX opset >= {MIN_ONNX_OPSET}, "
                f"the model imports opset {opset}"
            )
        header = f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]>\n'
        return onnx.parser.parse_function(header + self._body)


def check_slots(op_name: str, unpack_info: np.ndarray, max_valid_num: int, dynamic: int) -> None:
    """unpack_info has max_valid_num entries (static), or at most that many (dynamic)."""
    count = len(unpack_info)
    if count > max_valid_num if dynamic else count != max_valid_num:
        want = f"at most max_valid_num={max_valid_num}" if dynamic else f"max_valid_num={max_valid_num}"
        raise PoprtError(f"{op_name}: input '{UNPACK_INFO}' must have {want} elements, got {count}")


def check_unpack_info(
    op_name: str,
    unpack_info: np.ndarray,
    limit: int,
    limit_name: str,
    slots: tuple[int, int] | None = None,
    slots_of: str = "",
) -> None:
    """Check request lengths: none negative, none above `limit`, and they fit `slots` (B, S)."""
    info = np.asarray(unpack_info)
    for bad, what in ((info < 0, "is negative"), (info > limit, f"exceeds {limit_name} {limit}")):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PoprtError(f"{op_name}: unpack_info[{i}]={info[i]} {what}")
    if slots is not None and int(info.sum()) > slots[0] * slots[1]:
        raise PoprtError(
            f"{op_name}: unpack_info holds {int(info.sum())} tokens, more than the "
            f"{slots[0] * slots[1]} token slots of {slots_of} ({slots[0]}x{slots[1]})"
        )
