"""Rendering a `DiffResult`: the text report (plain, or coloured by rich on a terminal) and the JSON
report. Owns every word and sign the user reads; what is compared is decided in `match`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from poprt_lite.tools.diff.model import (
    DiffResult,
    FieldChange,
    InitializerChange,
    NodeChange,
    ValueChange,
    op_name,
)

# --- JSON -------------------------------------------------------------------------------------


def report_dict(result: DiffResult) -> dict[str, Any]:
    """The JSON report as plain data: labels, verdict, ignored sections, counts, every entry."""
    return {
        "a": result.a,
        "b": result.b,
        "equal": result.equal,
        "ignored": list(result.ignored),
        "summary": result.summary(),
        **{section: [dataclasses.asdict(c) for c in getattr(result, section)] for section in result.SECTIONS},
    }


def report_json(result: DiffResult) -> str:
    return json.dumps(report_dict(result), indent=2, default=str)


# --- text -------------------------------------------------------------------------------------

SIGNS = {"added": ("+", "green"), "removed": ("-", "red"), "changed": ("~", "yellow")}


def _format_value(value: Any) -> str:
    """Strings quoted, lists element by element, the rest as `str` (e.g. a `TensorSummary`)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def _describe_node(change: NodeChange) -> str:
    text = f"node {op_name(change.domain, change.op_type)}"
    names = [n for n in (change.node_a, change.node_b) if n]
    if names:
        text += f" '{names[0]}'"
        if change.kind == "changed" and change.node_b and change.node_a and change.node_b != change.node_a:
            text += f" (B: '{change.node_b}')"
    if change.kind == "changed":
        details = [f"attribute {c.name}: {_format_value(c.old)} -> {_format_value(c.new)}" for c in change.attributes]
        details += [f"input {c.index}: {c.old or '(none)'} -> {c.new or '(none)'}" for c in change.rewired]
        return f"{text} -> ({', '.join(change.outputs)}): " + "; ".join(details)
    attributes = " ".join(
        f"{c.name}={_format_value(c.new if change.kind == 'added' else c.old)}" for c in change.attributes
    )
    return f"{text}{' ' + attributes if attributes else ''}: ({', '.join(change.inputs)}) -> ({', '.join(change.outputs)})"


def _describe_value(section: str, change: ValueChange) -> str:
    if change.kind == "changed":
        return f"{section} {change.name}: {change.old} -> {change.new}"
    return f"{section} {change.name}: {change.old or change.new}"


def _describe_initializer(change: InitializerChange) -> str:
    if change.kind != "changed":
        return f"initializer {change.name}: {change.old or change.new}"
    return f"initializer {change.name}: {'/'.join(change.aspects)} {change.old} -> {change.new}"


def _describe_field(section: str, change: FieldChange) -> str:
    if change.kind == "changed":
        return f"{section} {change.key}: {_format_value(change.old)} -> {_format_value(change.new)}"
    return f"{section} {change.key}: {_format_value(change.old if change.kind == 'removed' else change.new)}"


def report_lines(result: DiffResult) -> list[tuple[str, str | None]]:
    """The text report as (line, style) pairs: a summary, then one line per change."""
    ignored = f" (ignoring {', '.join(result.ignored)})" if result.ignored else ""
    count_a, count_b = result.node_counts
    if result.equal:
        return [(f"equal: {result.a} and {result.b} compute the same graph ({count_a} nodes){ignored}", "bold green")]
    lines: list[tuple[str, str | None]] = [(f"different: {result.a} -> {result.b}{ignored}", "bold")]
    summary = result.summary()
    node_parts = [
        f"{sum(ops.values())} {kind} ({', '.join(f'{op} {n}' for op, n in ops.items())})"
        for kind in ("added", "removed", "changed")
        if (ops := summary["nodes"][kind])
    ]
    if node_parts:
        lines.append((f"  nodes: {count_a} -> {count_b}: {'; '.join(node_parts)}", None))
    for section in result.SECTIONS[1:]:
        if summary[section]:
            counts = ", ".join(f"{n} {kind}" for kind, n in summary[section].items())
            lines.append((f"  {section.replace('_', ' ')}: {counts}", None))
    describe = [
        *((c, _describe_node(c)) for c in result.nodes),
        *((c, _describe_value("input", c)) for c in result.inputs),
        *((c, _describe_value("output", c)) for c in result.outputs),
        *((c, _describe_initializer(c)) for c in result.initializers),
        *((c, _describe_field("opset" if c.key != "ir_version" else "model", c)) for c in result.opsets),
        *((c, _describe_field("function", c)) for c in result.functions),
        *((c, _describe_field("metadata", c)) for c in result.metadata),
        *((c, _describe_field("doc_string", c)) for c in result.doc_strings),
    ]
    for change, text in describe:
        sign, style = SIGNS[change.kind]
        lines.append((f"{sign} {text}", style))
    return lines


def format_report(result: DiffResult) -> str:
    return "\n".join(line for line, _ in report_lines(result))


def print_report(result: DiffResult, console: Console | None = None) -> None:
    """Print the text report; rich colours it when stdout is a terminal."""
    console = console or Console(highlight=False, soft_wrap=True)
    for line, style in report_lines(result):
        console.print(f"[{style}]{escape(line)}[/]" if style else escape(line))
