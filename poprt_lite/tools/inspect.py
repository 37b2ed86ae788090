"""`poprt-lite inspect`: what a model or an artifact holds, as a dict (for --json) or as text."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from poprt_lite.ir import METADATA_PREFIX
from poprt_lite.ir.artifact import Artifact, load_model_or_artifact
from poprt_lite.tools.diff.model import dtype_name, op_name
from poprt_lite.vocab import MetaKey


def inspect_path(path: str | os.PathLike) -> dict[str, Any]:
    loaded = load_model_or_artifact(path)
    if isinstance(loaded, Artifact):
        return summarize(loaded.model(), loaded.manifest, str(path))
    return summarize(loaded, None, str(path))


def summarize(model: onnx.ModelProto, manifest: dict[str, Any] | None = None, path: str = "") -> dict[str, Any]:
    """Interface, op histogram, custom ops, opsets, poprt-lite metadata and (for an artifact) the
    manifest summary. Plain JSON types throughout."""
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    # Artifacts carry each input's role and each output's layout in the manifest.
    roles = {v["name"]: v.get("role") for v in manifest["inputs"]} if manifest else {}
    layouts = {v["name"]: v.get("layout") for v in manifest["outputs"]} if manifest else {}
    inputs = [
        _value_entry(v) | ({"role": roles[v.name]} if v.name in roles else {})
        for v in graph.input
        if v.name not in initializer_names  # IR < 4 models also list their weights as inputs
    ]
    outputs = [_value_entry(v) | ({"layout": layouts[v.name]} if v.name in layouts else {}) for v in graph.output]
    ops = Counter(op_name(node.domain, node.op_type) for node in graph.node)
    custom = Counter((node.domain, node.op_type) for node in graph.node if node.domain not in ("", "ai.onnx"))
    parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
    report: dict[str, Any] = {
        "path": path,
        "kind": "artifact" if manifest is not None else "model",
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "inputs": inputs,
        "outputs": outputs,
        "nodes": len(graph.node),
        "ops": dict(sorted(ops.items(), key=lambda item: (-item[1], item[0]))),
        "custom_ops": [{"domain": d, "op_type": op, "count": n} for (d, op), n in sorted(custom.items())],
        "functions": [f"{f.domain}::{f.name}" for f in model.functions],
        "initializers": {"count": len(graph.initializer), "parameters": parameters, "bytes": sum(_nbytes(t) for t in graph.initializer)},
        "metadata": {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)},
    }
    if manifest is not None:
        report["manifest"] = {
            "poprt_lite_version": manifest.get("poprt_lite_version"),
            **{key.value: manifest.get(key.value) for key in (MetaKey.precision, MetaKey.pack, MetaKey.position_offset, MetaKey.vocab_size)},
            "pipeline": [
                {key: step.get(key) for key in ("name", "seconds", "changed", "message")} for step in manifest.get("pipeline", [])
            ],
        }
    return report


def _value_entry(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """An input's or output's name, dtype and shape (None for an unknown rank or dim)."""
    tensor_type = value.type.tensor_type
    shape = (
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        if tensor_type.HasField("shape")
        else None
    )
    return {"name": value.name, "dtype": dtype_name(tensor_type.elem_type), "shape": shape}


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return onnx.numpy_helper.to_array(tensor).nbytes


def print_inspection(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(highlight=False, soft_wrap=True)
    opsets = ", ".join(f"{domain} {version}" for domain, version in report["opsets"].items())
    init = report["initializers"]
    console.print(f"[bold]{escape(report['path'])}[/] ({report['kind']})")
    console.print(escape(f"ir_version {report['ir_version']}, opsets: {opsets}; producer: {report['producer'] or '-'}"))
    console.print(
        f"{report['nodes']} nodes, {init['count']} initializers "
        f"({init['parameters']:,} parameters, {init['bytes'] / 2**20:.1f} MiB)"
    )
    for title, values, extra in (("inputs", report["inputs"], "role"), ("outputs", report["outputs"], "layout")):
        show_extra = any(extra in v for v in values)
        table = Table("name", "dtype", "shape", *([extra] if show_extra else []), title=title, title_justify="left")
        for v in values:
            shape = "?" if v["shape"] is None else "[" + ", ".join("?" if d is None else str(d) for d in v["shape"]) + "]"
            table.add_row(escape(v["name"]), v["dtype"], escape(shape), *([v.get(extra) or ""] if show_extra else []))
        console.print(table)
    ops = Table("op", "count", title="ops", title_justify="left")
    for op, count in report["ops"].items():
        ops.add_row(escape(op), str(count))
    console.print(ops)
    if report["custom_ops"]:
        custom = ", ".join(f"{c['domain']}::{c['op_type']} x{c['count']}" for c in report["custom_ops"])
        console.print(escape(f"custom ops: {custom}"))
    if report["functions"]:
        console.print(escape(f"functions: {', '.join(report['functions'])}"))
    if report["metadata"]:
        metadata = Table("key", "value", title="metadata", title_justify="left")
        for key, value in report["metadata"].items():
            metadata.add_row(escape(key), escape(value))
        console.print(metadata)
    manifest = report.get("manifest")
    if manifest:
        console.print(
            escape(
                f"manifest: precision {manifest[MetaKey.precision.value]}, pack {manifest[MetaKey.pack.value] or '-'}, "
                f"position_offset {manifest[MetaKey.position_offset.value]}, written by poprt-lite {manifest['poprt_lite_version']}"
            )
        )
        pipeline = Table("pass", "time (ms)", "changed", "message", title="pipeline", title_justify="left")
        for step in manifest["pipeline"]:
            seconds = step["seconds"]
            pipeline.add_row(
                escape(str(step["name"])), "" if seconds is None else f"{seconds * 1000:.1f}", str(step["changed"]), escape(step["message"] or "")
            )
        console.print(pipeline)
