"""The diff's data model: the name-free canonical forms two models are compared by, and the report.

Owns how a tensor (`tensor_summary`: dtype, shape, content hash), a value's type (`value_type`),
an attribute (`attribute_value`), an op (`op_name`), a node's op-and-attributes signature
(`node_signature`) and an initializer (`initializer_key`) are written down for comparison, and
the report entries (`NodeChange`, `InitializerChange`, ... gathered in `DiffResult`, with its
counts). Matching lives in `match`, text and JSON output in `render`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx.printer
from onnx import numpy_helper

IGNORABLE = ("initializer_values", "doc_strings", "metadata")
# Tensors with at most this many elements are shown by value, larger ones by hash.
PREVIEW_ELEMENTS = 8
SHORT_HASH = 12


# --- report entries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSummary:
    """What identifies a tensor's content: dtype, shape and the sha256 of its bytes."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str
    preview: tuple[str, ...] | None = None  # the values of tiny tensors, for reading

    def __str__(self) -> str:
        head = f"{self.dtype}[{','.join(map(str, self.shape))}]"
        if self.preview is not None:
            return f"{head} {{{', '.join(self.preview)}}}"
        return f"{head} sha256:{self.sha256[:SHORT_HASH]}"


@dataclass(frozen=True)
class AttributeChange:
    name: str
    old: Any  # None when the attribute is absent on that side
    new: Any


@dataclass(frozen=True)
class InputChange:
    """Input `index` of a matched node now reads another tensor (names as in A and B)."""

    index: int
    old: str | None
    new: str | None


@dataclass(frozen=True)
class NodeChange:
    """A node added (only in B), removed (only in A) or changed (matched, but different).

    `inputs`/`outputs` are the node's tensors (B's for added and changed nodes, A's for removed
    ones); `attributes` lists all attributes of an added/removed node and the differing ones of a
    changed node; `rewired` the inputs of a changed node that read another tensor now.
    """

    kind: str
    op_type: str
    domain: str = ""
    node_a: str | None = None
    node_b: str | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    attributes: tuple[AttributeChange, ...] = ()
    rewired: tuple[InputChange, ...] = ()


@dataclass(frozen=True)
class ValueChange:
    """A graph input or output added, removed, or with another type, e.g. `float32[batch,128]`."""

    kind: str
    name: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class InitializerChange:
    """An initializer added, removed or changed; `aspects` says what changed: dtype, shape, or
    (when both are the same) value."""

    kind: str
    name: str
    old: TensorSummary | None
    new: TensorSummary | None
    aspects: tuple[str, ...] = ()


@dataclass(frozen=True)
class FieldChange:
    """A keyed model-level field: an opset, a metadata entry, a doc string, a local function."""

    kind: str
    key: str
    old: Any
    new: Any


@dataclass
class DiffResult:
    a: str
    b: str
    node_counts: tuple[int, int]
    nodes: list[NodeChange] = field(default_factory=list)
    inputs: list[ValueChange] = field(default_factory=list)
    outputs: list[ValueChange] = field(default_factory=list)
    initializers: list[InitializerChange] = field(default_factory=list)
    opsets: list[FieldChange] = field(default_factory=list)  # with the IR version (key "ir_version")
    functions: list[FieldChange] = field(default_factory=list)
    metadata: list[FieldChange] = field(default_factory=list)
    doc_strings: list[FieldChange] = field(default_factory=list)
    ignored: tuple[str, ...] = ()

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "nodes", "inputs", "outputs", "initializers", "opsets", "functions", "metadata", "doc_strings",
    )  # fmt: skip

    @property
    def equal(self) -> bool:
        return not any(getattr(self, section) for section in self.SECTIONS)

    def summary(self) -> dict[str, Any]:
        """Counts per section and kind; for nodes also per op type."""
        out: dict[str, Any] = {}
        for section in self.SECTIONS:
            entries = getattr(self, section)
            if section == "nodes":
                out[section] = {"a": self.node_counts[0], "b": self.node_counts[1]} | {
                    kind: dict(sorted(Counter(op_name(c.domain, c.op_type) for c in entries if c.kind == kind).items()))
                    for kind in ("added", "removed", "changed")
                }
            else:
                out[section] = dict(Counter(c.kind for c in entries))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON report as plain data (`render.report_dict`)."""
        from poprt_lite.tools.diff.render import report_dict  # render builds on this module

        return report_dict(self)

    def to_json(self) -> str:
        """The JSON report (`render.report_json`)."""
        from poprt_lite.tools.diff.render import report_json

        return report_json(self)


# --- canonical forms --------------------------------------------------------------------------


def op_name(domain: str, op_type: str) -> str:
    """`Softmax` for the default domain (`""` or `"ai.onnx"`), else `domain::OpType`."""
    return f"{domain}::{op_type}" if domain not in ("", "ai.onnx") else op_type


def dtype_name(elem_type: int) -> str:
    """numpy's name of an ONNX element type (`float32`, `int64`, `bfloat16`; `string`)."""
    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def tensor_summary(tensor: onnx.TensorProto) -> TensorSummary:
    """dtype, shape and sha256 of the content, however the tensor stores it (raw or typed fields)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        data = b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data)
    elif tensor.HasField("raw_data"):
        data = tensor.raw_data
    else:
        data = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    shape = tuple(tensor.dims)
    preview = None
    if int(np.prod(shape)) <= PREVIEW_ELEMENTS:
        values = numpy_helper.to_array(tensor).ravel()
        # numpy's scalar str is the shortest text that reads back as the same value of that dtype
        preview = tuple(repr(v.decode(errors="replace")) if isinstance(v, bytes) else str(v) for v in values)
    return TensorSummary(dtype_name(tensor.data_type), shape, hashlib.sha256(data).hexdigest(), preview)


def value_type(value: onnx.ValueInfoProto) -> str:
    """`float32[batch,128]`; `float32` when the rank is unknown, `?` for an unknown dim."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return kind or "untyped"
    tensor_type = value.type.tensor_type
    dtype = dtype_name(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return dtype
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    return f"{dtype}[{','.join(dims)}]"


def attribute_value(attr: onnx.AttributeProto) -> Any:
    """A comparable, printable form of an attribute value (tensors as summaries, graphs by hash)."""
    if attr.ref_attr_name:
        return f"@{attr.ref_attr_name}"
    kind = onnx.AttributeProto
    if attr.type == kind.TENSOR:
        return tensor_summary(attr.t)
    if attr.type == kind.TENSORS:
        return [tensor_summary(t) for t in attr.tensors]
    if attr.type == kind.GRAPH:
        return f"graph sha256:{text_hash(attr.g)}"
    if attr.type == kind.GRAPHS:
        return [f"graph sha256:{text_hash(g)}" for g in attr.graphs]
    if attr.type in (kind.SPARSE_TENSOR, kind.SPARSE_TENSORS, kind.TYPE_PROTO, kind.TYPE_PROTOS):
        return f"{kind.AttributeType.Name(attr.type).lower()} sha256:{hashlib.sha256(attr.SerializeToString()).hexdigest()[:SHORT_HASH]}"
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
    return value


def text_hash(proto: onnx.GraphProto | onnx.FunctionProto) -> str:
    """Short sha256 of the printed text: how subgraphs and model-local functions are compared."""
    return hashlib.sha256(onnx.printer.to_text(proto).encode()).hexdigest()[:SHORT_HASH]


def digest(*parts: Any) -> bytes:
    """A 16-byte hash of `parts` (by their repr): the matcher's keys."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def node_signature(op_key: tuple[str, str], attributes: dict[str, Any]) -> bytes:
    """What a node computes, leaving out its inputs: (domain, op type) and attribute values."""
    return digest(op_key, sorted(attributes.items()))


def initializer_key(name: str, summary: TensorSummary, ignore_values: bool) -> tuple:
    """An initializer as a node input: by name, dtype, shape and (unless ignored) content hash."""
    if ignore_values:
        return (name, summary.dtype, summary.shape)
    return (name, summary.dtype, summary.shape, summary.sha256)
