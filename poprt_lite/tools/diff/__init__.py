"""Structural diff of two ONNX models, independent of node names and node order.

`diff_models(a, b)` returns a `DiffResult`; `print_report`, `format_report` and `report_json`
(also `DiffResult.to_json`) render it. Three modules:

- `model`: the canonical forms things are compared by (tensor summaries, types, attribute values,
  node signatures, initializer keys) and the report entries;
- `match`: the matching walk that pairs nodes by what they compute (its docstring explains the
  strategy), the by-name comparison of everything else, and `diff_models`;
- `render`: the text and JSON reports.
"""

from poprt_lite.tools.diff.match import diff_models
from poprt_lite.tools.diff.model import (
    IGNORABLE,
    PREVIEW_ELEMENTS,
    SHORT_HASH,
    AttributeChange,
    DiffResult,
    FieldChange,
    InitializerChange,
    InputChange,
    NodeChange,
    TensorSummary,
    ValueChange,
    dtype_name,
    op_name,
    tensor_summary,
    value_type,
)
from poprt_lite.tools.diff.render import SIGNS, format_report, print_report, report_json, report_lines

__all__ = [
    "IGNORABLE",
    "PREVIEW_ELEMENTS",
    "SHORT_HASH",
    "SIGNS",
    "AttributeChange",
    "DiffResult",
    "FieldChange",
    "InitializerChange",
    "InputChange",
    "NodeChange",
    "TensorSummary",
    "ValueChange",
    "diff_models",
    "dtype_name",
    "format_report",
    "op_name",
    "print_report",
    "report_json",
    "report_lines",
    "tensor_summary",
    "value_type",
]
