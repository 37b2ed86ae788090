"""Structural diff of two ONNX models, independent of node names and node order.

Nodes are matched by what they compute. A node's key hashes its op type, domain and attributes
with the keys of its inputs: graph inputs by name, initializers by name and content hash, other
tensors by their producer's key and output index. Keys are computed in topological order, so two
nodes get the same key exactly when they compute the same function of the same inputs, whatever
they and their tensors are called; equal keys are matched as multisets.

A change changes the key of everything downstream of it, so matching runs in both directions and
a matched node lends its partner's key to the nodes that read it: forwards (B in topological
order: a node whose inputs come from matched nodes matches the A node computing the same thing)
and backwards (B in reverse order, keys built from a node's consumers up to the graph outputs,
which match by name), until nothing more matches. Then nodes that still differ are paired with
the A node of the same op type that shares most of their inputs (or consumers): a changed Softmax
axis reads as `axis: 3 -> 1` on one node, an inserted Cast as one added node, not as everything
downstream removed and added again. Exact matching always gets the first chance, so a similar
node never takes an identical node's place.

Besides nodes: graph inputs/outputs (name, dtype, shape), initializers (by name: dtype, shape,
value), opset imports and IR version, model-local functions, metadata and doc strings.
`value_info` shape annotations are derived data and not compared; subgraph attributes (If/Loop
bodies) and functions are compared as printed text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
import numpy as np
import onnx
import onnx.printer
from onnx import numpy_helper
from rich.console import Console
from rich.markup import escape

from poprt_lite.errors import PoprtError

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
                    kind: dict(sorted(Counter(_op_name(c) for c in entries if c.kind == kind).items()))
                    for kind in ("added", "removed", "changed")
                }
            else:
                out[section] = dict(Counter(c.kind for c in entries))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "ignored": list(self.ignored),
            "summary": self.summary(),
            **{section: [dataclasses.asdict(c) for c in getattr(self, section)] for section in self.SECTIONS},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


# --- entry point ------------------------------------------------------------------------------


def diff_models(
    a: onnx.ModelProto, b: onnx.ModelProto, *, ignore: Iterable[str] = (), labels: tuple[str, str] = ("A", "B")
) -> DiffResult:
    """Compare `a` (old) with `b` (new). `ignore` takes names from `IGNORABLE`."""
    ignore = tuple(ignore)
    unknown = sorted(set(ignore) - set(IGNORABLE))
    if unknown:
        raise PoprtError(f"--ignore takes {', '.join(IGNORABLE)}; got '{unknown[0]}'")
    ignore_values = "initializer_values" in ignore
    summaries = [{t.name: tensor_summary(t) for t in m.graph.initializer} for m in (a, b)]
    side_a = _Side(a.graph, summaries[0], ignore_values, labels[0])
    side_b = _Side(b.graph, summaries[1], ignore_values, labels[1])
    matching = _Matching(side_a, side_b)
    matching.run()
    result = DiffResult(a=labels[0], b=labels[1], node_counts=(len(side_a.nodes), len(side_b.nodes)), ignored=ignore)
    result.nodes = matching.node_changes()
    result.inputs = _diff_values(a.graph.input, b.graph.input)
    result.outputs = _diff_values(a.graph.output, b.graph.output)
    result.initializers = _diff_initializers(*summaries, ignore_values)
    result.opsets = _diff_fields(_versions(a), _versions(b))
    result.functions = _diff_fields(_functions(a), _functions(b))
    if "metadata" not in ignore:
        result.metadata = _diff_fields(_metadata(a), _metadata(b))
    if "doc_strings" not in ignore:
        result.doc_strings = _diff_fields(
            {"model": a.doc_string, "graph": a.graph.doc_string}, {"model": b.doc_string, "graph": b.graph.doc_string}
        ) + matching.doc_string_changes()
    return result


# --- tensors and types ------------------------------------------------------------------------


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


def _attribute_value(attr: onnx.AttributeProto) -> Any:
    """A comparable, printable form of an attribute value (tensors as summaries, graphs by hash)."""
    if attr.ref_attr_name:
        return f"@{attr.ref_attr_name}"
    kind = onnx.AttributeProto
    if attr.type == kind.TENSOR:
        return tensor_summary(attr.t)
    if attr.type == kind.TENSORS:
        return [tensor_summary(t) for t in attr.tensors]
    if attr.type == kind.GRAPH:
        return f"graph sha256:{_text_hash(attr.g)}"
    if attr.type == kind.GRAPHS:
        return [f"graph sha256:{_text_hash(g)}" for g in attr.graphs]
    if attr.type in (kind.SPARSE_TENSOR, kind.SPARSE_TENSORS, kind.TYPE_PROTO, kind.TYPE_PROTOS):
        return f"{kind.AttributeType.Name(attr.type).lower()} sha256:{hashlib.sha256(attr.SerializeToString()).hexdigest()[:SHORT_HASH]}"
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
    return value


def _text_hash(proto: onnx.GraphProto | onnx.FunctionProto) -> str:
    return hashlib.sha256(onnx.printer.to_text(proto).encode()).hexdigest()[:SHORT_HASH]


def _digest(*parts: Any) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


# --- one side of the comparison ---------------------------------------------------------------

# Where a node input comes from: ("node", producer index, output index), ("init", name),
# ("input", name), ("free", name) for a name nothing defines (outer scope), or ("absent",) for an
# omitted optional input.
Source = tuple


class _Side:
    """A graph as the matcher sees it: per node its label, input sources, consumers and graph
    outputs, and a topological order (from networkx)."""

    def __init__(self, graph: onnx.GraphProto, summaries: dict[str, TensorSummary], ignore_values: bool, what: str):
        self.nodes = list(graph.node)
        self.attributes = [{a.name: _attribute_value(a) for a in node.attribute} for node in self.nodes]
        self.op_keys = [(node.domain if node.domain != "ai.onnx" else "", node.op_type) for node in self.nodes]
        self.labels = [_digest(op, sorted(attrs.items())) for op, attrs in zip(self.op_keys, self.attributes)]
        self.init_keys = {
            name: (name, s.dtype, s.shape) if ignore_values else (name, s.dtype, s.shape, s.sha256) for name, s in summaries.items()
        }
        self.producer: dict[str, tuple[int, int]] = {}
        for i, node in enumerate(self.nodes):
            for k, name in enumerate(node.output):
                if name:
                    self.producer[name] = (i, k)
        graph_inputs = {v.name for v in graph.input}
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(self.nodes)))
        self.sources: list[list[Source]] = []
        self.consumers: list[list[list[tuple[int, int]]]] = [[[] for _ in node.output] for node in self.nodes]
        self.readers: dict[Source, list[tuple[int, int]]] = defaultdict(list)  # source -> (consumer, slot)
        for i, node in enumerate(self.nodes):
            row: list[Source] = []
            for slot, name in enumerate(node.input):
                if not name:
                    source: Source = ("absent",)
                elif name in self.producer:
                    j, k = self.producer[name]
                    source = ("node", j, k)
                    dag.add_edge(j, i)
                    self.consumers[j][k].append((i, slot))
                elif name in self.init_keys:
                    source = ("init", name)
                elif name in graph_inputs:
                    source = ("input", name)
                else:
                    source = ("free", name)
                row.append(source)
                self.readers[source].append((i, slot))
            self.sources.append(row)
        self.graph_outputs: list[list[tuple[str, ...]]] = [[() for _ in node.output] for node in self.nodes]
        for value in graph.output:
            if value.name in self.producer:
                j, k = self.producer[value.name]
                self.graph_outputs[j][k] += (value.name,)
        try:
            self.order = list(nx.topological_sort(dag))
        except nx.NetworkXUnfeasible:
            raise PoprtError(f"{what}: the graph has a cycle; it is not a valid ONNX model") from None
        self.rank = {n: r for r, n in enumerate(self.order)}

    def source(self, node: int, slot: int) -> Source:
        row = self.sources[node]
        return row[slot] if slot < len(row) else ("absent",)

    def tensor(self, node: int, slot: int) -> str | None:
        names = self.nodes[node].input
        return names[slot] if slot < len(names) and names[slot] else None

    def uses(self, node: int) -> set[tuple]:
        """(output index, consumer, slot) and (output index, graph output name) of `node`."""
        out: set[tuple] = set()
        for k, readers in enumerate(self.consumers[node]):
            out.update((k, "consumer", c, slot) for c, slot in readers)
            out.update((k, "output", name) for name in self.graph_outputs[node][k])
        return out


# --- matching ---------------------------------------------------------------------------------


class _Matching:
    """Pairs nodes of A and B; see the module docstring for the strategy."""

    def __init__(self, a: _Side, b: _Side):
        self.a, self.b = a, b
        self.b_to_a: dict[int, int] = {}
        self.a_to_b: dict[int, int] = {}
        self.forward_a = self._forward_keys(a, {})
        self.backward_a = self._backward_keys(a, {})

    def run(self) -> None:
        while True:
            if self._forward_pass(similar=False) + self._backward_pass(similar=False):
                continue
            if self._forward_pass(similar=True) + self._backward_pass(similar=True):
                continue
            return

    def _pair(self, a: int, b: int) -> None:
        self.a_to_b[a] = b
        self.b_to_a[b] = a

    # Keys. A's are computed once; a matched B node takes its partner's key, so its consumers
    # (forward) or producers (backward) can match A's exactly.

    def _source_key(self, side: _Side, source: Source, keys: list[bytes]) -> tuple:
        if source[0] == "node":
            return ("node", keys[source[1]], source[2])
        if source[0] == "init":
            return ("init", side.init_keys[source[1]])
        return source

    def _forward_key(self, side: _Side, node: int, keys: list[bytes]) -> bytes:
        return _digest(side.labels[node], [self._source_key(side, s, keys) for s in side.sources[node]])

    def _backward_key(self, side: _Side, node: int, keys: list[bytes]) -> bytes:
        uses = [
            (sorted((keys[c], slot) for c, slot in readers), side.graph_outputs[node][k])
            for k, readers in enumerate(side.consumers[node])
        ]
        return _digest(side.labels[node], uses)

    def _forward_keys(self, side: _Side, inherited: dict[int, bytes]) -> list[bytes]:
        keys = [b""] * len(side.nodes)
        for node in side.order:
            keys[node] = inherited[node] if node in inherited else self._forward_key(side, node, keys)
        return keys

    def _backward_keys(self, side: _Side, inherited: dict[int, bytes]) -> list[bytes]:
        keys = [b""] * len(side.nodes)
        for node in reversed(side.order):
            keys[node] = inherited[node] if node in inherited else self._backward_key(side, node, keys)
        return keys

    def _unmatched_a_by_key(self, keys: list[bytes]) -> dict[bytes, list[int]]:
        index: dict[bytes, list[int]] = defaultdict(list)
        for node in reversed(self.a.order):  # popped from the end: A's topological order
            if node not in self.a_to_b:
                index[keys[node]].append(node)
        return index

    def _forward_pass(self, similar: bool) -> int:
        """Walk B's nodes in topological order and pair each unmatched one with an unmatched A node of the
        same key (or, if `similar`, the most similar one); matches feed the keys of later nodes."""
        return self._matching_pass(self.forward_a, self.b.order, self._forward_key, self._similar_by_inputs if similar else None)

    def _backward_pass(self, similar: bool) -> int:
        """The same walk from the outputs back, keyed by what each node's outputs are used for."""
        return self._matching_pass(
            self.backward_a, list(reversed(self.b.order)), self._backward_key, self._similar_by_uses if similar else None
        )

    def _matching_pass(self, a_keys: list[bytes], order: list[int], key_of, similar_to) -> int:
        index = self._unmatched_a_by_key(a_keys)
        keys = [b""] * len(self.b.nodes)
        found = 0
        for node in order:
            partner = self.b_to_a.get(node)
            if partner is None:
                key = key_of(self.b, node, keys)
                partner = _pop_unmatched(index.get(key), self.a_to_b)
                if partner is None and similar_to is not None:
                    partner = similar_to(node)
                if partner is None:
                    keys[node] = key
                    continue
                self._pair(partner, node)
                found += 1
            keys[node] = a_keys[partner]
        return found

    def _a_source(self, source: Source) -> Source | None:
        """A B input source in A's terms, or None when its producer has no partner."""
        if source[0] != "node":
            return source
        partner = self.b_to_a.get(source[1])
        return None if partner is None else ("node", partner, source[2])

    def _best(self, node: int, candidates: Iterable[int], score) -> int | None:
        """The unmatched candidate with the same op type and the highest positive score; ties go to
        the one with the same attributes, then the first in A's order."""
        best, best_rank = None, None
        for candidate in set(candidates):
            if candidate in self.a_to_b or self.a.op_keys[candidate] != self.b.op_keys[node]:
                continue
            points = score(candidate)
            if points <= 0:
                continue
            rank = (-points, self.a.labels[candidate] != self.b.labels[node], self.a.rank[candidate])
            if best_rank is None or rank < best_rank:
                best, best_rank = candidate, rank
        return best

    def _similar_by_inputs(self, node: int) -> int | None:
        """The A node of the same op type that reads most of this node's inputs at the same slots."""
        wanted = [(slot, self._a_source(s)) for slot, s in enumerate(self.b.sources[node])]
        wanted = [(slot, s) for slot, s in wanted if s is not None and s != ("absent",)]
        candidates = (c for slot, s in wanted for c, c_slot in self.a.readers.get(s, ()) if c_slot == slot)
        return self._best(node, candidates, lambda c: sum(self.a.source(c, slot) == s for slot, s in wanted))

    def _similar_by_uses(self, node: int) -> int | None:
        """The A node of the same op type that feeds most of this node's consumers (at the same
        slots) or graph outputs."""
        wanted = set()
        for use in self.b.uses(node):
            if use[1] == "output":
                wanted.add(use)
            elif use[2] in self.b_to_a:
                wanted.add((use[0], "consumer", self.b_to_a[use[2]], use[3]))
        candidates = []
        for use in wanted:
            if use[1] == "output":
                producer = self.a.producer.get(use[2])
                candidates += [producer[0]] if producer and producer[1] == use[0] else []
            else:
                source = self.a.source(use[2], use[3])
                candidates += [source[1]] if source[0] == "node" and source[2] == use[0] else []
        return self._best(node, candidates, lambda c: len(wanted & self.a.uses(c)))

    # Results

    def node_changes(self) -> list[NodeChange]:
        changes = []
        for a in self.a.order:
            b = self.a_to_b.get(a)
            if b is None:
                changes.append(_whole_node("removed", self.a, a))
                continue
            attributes = _attribute_changes(self.a.attributes[a], self.b.attributes[b])
            rewired = self._rewired(a, b)
            if attributes or rewired:
                node_b = self.b.nodes[b]
                changes.append(
                    NodeChange(
                        "changed",
                        node_b.op_type,
                        self.b.op_keys[b][0],
                        self.a.nodes[a].name,
                        node_b.name,
                        tuple(node_b.input),
                        tuple(node_b.output),
                        attributes,
                        rewired,
                    )
                )
        changes += [_whole_node("added", self.b, b) for b in self.b.order if b not in self.b_to_a]
        order = {"removed": 0, "added": 1, "changed": 2}
        return sorted(changes, key=lambda c: order[c.kind])

    def _rewired(self, a: int, b: int) -> tuple[InputChange, ...]:
        """Inputs that now read a tensor computed differently. An input from an added or removed
        node is not listed: that node's own entry says where it sits."""
        changes = []
        for slot in range(max(len(self.a.sources[a]), len(self.b.sources[b]))):
            source_a, source_b = self.a.source(a, slot), self._a_source(self.b.source(b, slot))
            if source_b is None or (source_a[0] == "node" and source_a[1] not in self.a_to_b):
                continue
            if self._rewire_key(source_a) != self._rewire_key(source_b):
                changes.append(InputChange(slot, self.a.tensor(a, slot), self.b.tensor(b, slot)))
        return tuple(changes)

    def _rewire_key(self, source: Source) -> Source:
        # Node outputs by key, not identity: of two identical Constants either one will do.
        # Initializers by name: a new value is the initializer's change, not the reader's.
        return ("node", self.forward_a[source[1]], source[2]) if source[0] == "node" else source

    def doc_string_changes(self) -> list[FieldChange]:
        changes = []
        for a in self.a.order:
            b = self.a_to_b.get(a)
            if b is not None and self.a.nodes[a].doc_string != self.b.nodes[b].doc_string:
                node = self.b.nodes[b]
                key = f"node {_op_name_of(node)} '{node.name}'" if node.name else f"node {_op_name_of(node)} -> {', '.join(node.output)}"
                changes.append(FieldChange("changed", key, self.a.nodes[a].doc_string, node.doc_string))
        return changes


def _pop_unmatched(candidates: list[int] | None, matched: dict[int, int]) -> int | None:
    while candidates:
        candidate = candidates.pop()
        if candidate not in matched:
            return candidate
    return None


def _whole_node(kind: str, side: _Side, index: int) -> NodeChange:
    node = side.nodes[index]
    attributes = tuple(
        AttributeChange(name, None, value) if kind == "added" else AttributeChange(name, value, None)
        for name, value in side.attributes[index].items()
    )
    names = {"node_b": node.name} if kind == "added" else {"node_a": node.name}
    return NodeChange(
        kind, node.op_type, side.op_keys[index][0], inputs=tuple(node.input), outputs=tuple(node.output), attributes=attributes, **names
    )


def _attribute_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[AttributeChange, ...]:
    return tuple(
        AttributeChange(name, old.get(name), new.get(name))
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    )


# --- everything but nodes ---------------------------------------------------------------------


def _diff_values(old: Sequence[onnx.ValueInfoProto], new: Sequence[onnx.ValueInfoProto]) -> list[ValueChange]:
    a = {v.name: value_type(v) for v in old}
    b = {v.name: value_type(v) for v in new}
    return (
        [ValueChange("removed", name, t, None) for name, t in a.items() if name not in b]
        + [ValueChange("added", name, None, t) for name, t in b.items() if name not in a]
        + [ValueChange("changed", name, t, b[name]) for name, t in a.items() if name in b and b[name] != t]
    )


def _diff_initializers(
    a: dict[str, TensorSummary], b: dict[str, TensorSummary], ignore_values: bool
) -> list[InitializerChange]:
    changes = [InitializerChange("removed", name, s, None) for name, s in a.items() if name not in b]
    changes += [InitializerChange("added", name, None, s) for name, s in b.items() if name not in a]
    for name, old in a.items():
        new = b.get(name)
        if new is None:
            continue
        # A new dtype or shape implies new bytes; "value" means same dtype and shape, other content.
        aspects = tuple(aspect for aspect in ("dtype", "shape") if getattr(old, aspect) != getattr(new, aspect))
        if not aspects and old.sha256 != new.sha256 and not ignore_values:
            aspects = ("value",)
        if aspects:
            changes.append(InitializerChange("changed", name, old, new, aspects))
    return changes


def _diff_fields(a: dict[str, Any], b: dict[str, Any]) -> list[FieldChange]:
    return (
        [FieldChange("removed", key, value, None) for key, value in a.items() if key not in b]
        + [FieldChange("added", key, None, value) for key, value in b.items() if key not in a]
        + [FieldChange("changed", key, value, b[key]) for key, value in a.items() if key in b and b[key] != value]
    )


def _versions(model: onnx.ModelProto) -> dict[str, int]:
    return {"ir_version": model.ir_version} | {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}


def _functions(model: onnx.ModelProto) -> dict[str, str]:
    return {f"{f.domain}::{f.name}": f"sha256:{_text_hash(f)}" for f in model.functions}


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    fields = {name: getattr(model, name) for name in ("producer_name", "producer_version", "domain", "model_version")}
    return {k: v for k, v in fields.items() if v} | {p.key: p.value for p in model.metadata_props}


# --- text report ------------------------------------------------------------------------------

SIGNS = {"added": ("+", "green"), "removed": ("-", "red"), "changed": ("~", "yellow")}


def _op_name_of(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _op_name(change: NodeChange) -> str:
    return f"{change.domain}::{change.op_type}" if change.domain else change.op_type


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _describe_node(change: NodeChange) -> str:
    text = f"node {_op_name(change)}"
    names = [n for n in (change.node_a, change.node_b) if n]
    if names:
        text += f" '{names[0]}'"
        if change.kind == "changed" and change.node_b and change.node_a and change.node_b != change.node_a:
            text += f" (B: '{change.node_b}')"
    if change.kind == "changed":
        details = [f"attribute {c.name}: {_show(c.old)} -> {_show(c.new)}" for c in change.attributes]
        details += [f"input {c.index}: {c.old or '(none)'} -> {c.new or '(none)'}" for c in change.rewired]
        return f"{text} -> ({', '.join(change.outputs)}): " + "; ".join(details)
    attributes = " ".join(f"{c.name}={_show(c.new if change.kind == 'added' else c.old)}" for c in change.attributes)
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
        return f"{section} {change.key}: {_show(change.old)} -> {_show(change.new)}"
    return f"{section} {change.key}: {_show(change.old if change.kind == 'removed' else change.new)}"


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
