"""Matching: pairs the parts of two models and lists what differs; `diff_models` is the entry point.

Nodes are matched by what they compute. A node's key hashes its signature (op type, domain and
attributes) with the keys of its inputs: graph inputs by name, initializers by name and content
hash, other tensors by their producer's key and output index. Keys are computed in topological
order, so two nodes get the same key exactly when they compute the same function of the same
inputs, whatever they and their tensors are called; equal keys are matched as multisets.

A change changes the key of everything downstream of it, so matching runs in both directions and
a matched node lends its partner's key to the nodes that read it: forwards (B in topological
order: a node whose inputs come from matched nodes matches the A node computing the same thing)
and backwards (B in reverse order, keys built from a node's consumers up to the graph outputs,
which match by name), until nothing more matches. Then nodes that still differ are paired with
the A node of the same op type that shares most of their inputs (or consumers): a changed Softmax
axis reads as `axis: 3 -> 1` on one node, an inserted Cast as one added node, not as everything
downstream removed and added again. Exact matching always gets the first chance, so a similar
node never takes an identical node's place.

Besides nodes, by name: graph inputs/outputs (dtype, shape), initializers (dtype, shape, value),
opset imports and IR version, model-local functions, metadata and doc strings. `value_info` shape
annotations are derived data and not compared; subgraph attributes (If/Loop bodies) and functions
are compared as printed text. The canonical forms and report entries come from `model`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import networkx as nx
import onnx

from poprt_lite.errors import PoprtError, option
from poprt_lite.tools.diff.model import (
    IGNORABLE,
    AttributeChange,
    DiffResult,
    FieldChange,
    InitializerChange,
    InputChange,
    NodeChange,
    TensorSummary,
    ValueChange,
    attribute_value,
    digest,
    initializer_key,
    node_signature,
    op_name,
    tensor_summary,
    text_hash,
    value_type,
)

T = TypeVar("T")

# --- entry point ------------------------------------------------------------------------------


def diff_models(
    a: onnx.ModelProto, b: onnx.ModelProto, *, ignore: Iterable[str] = (), labels: tuple[str, str] = ("A", "B")
) -> DiffResult:
    """Compare `a` (old) with `b` (new). `ignore` takes names from `IGNORABLE`."""
    ignore = tuple(ignore)
    unknown = sorted(set(ignore) - set(IGNORABLE))
    if unknown:
        raise PoprtError(f"{option('ignore')} takes {', '.join(IGNORABLE)}; got '{unknown[0]}'")
    ignore_values = "initializer_values" in ignore
    summaries = [{t.name: tensor_summary(t) for t in m.graph.initializer} for m in (a, b)]
    view_a = GraphView(a.graph, summaries[0], ignore_values, labels[0])
    view_b = GraphView(b.graph, summaries[1], ignore_values, labels[1])
    matcher = NodeMatcher(view_a, view_b)
    matcher.run()
    result = DiffResult(a=labels[0], b=labels[1], node_counts=(len(view_a.nodes), len(view_b.nodes)), ignored=ignore)
    result.nodes = matcher.node_changes()
    result.inputs = _diff_interface(a.graph.input, b.graph.input)
    result.outputs = _diff_interface(a.graph.output, b.graph.output)
    result.initializers = _diff_initializers(*summaries, ignore_values)
    result.opsets = _diff_fields(_versions(a), _versions(b))
    result.functions = _diff_fields(_function_hashes(a), _function_hashes(b))
    if "metadata" not in ignore:
        result.metadata = _diff_fields(_metadata(a), _metadata(b))
    if "doc_strings" not in ignore:
        result.doc_strings = _diff_fields(
            {"model": a.doc_string, "graph": a.graph.doc_string}, {"model": b.doc_string, "graph": b.graph.doc_string}
        ) + matcher.doc_string_changes()
    return result


# --- a graph as the matcher sees it --------------------------------------------------------------

# Where a node input comes from: ("node", producer index, output index), ("init", name),
# ("input", name), ("free", name) for a name nothing defines (outer scope), or ("absent",) for an
# omitted optional input.
Source = tuple


class GraphView:
    """One side's graph as the matcher sees it: per node its signature, input sources, consumers
    and graph outputs, and a topological order (from networkx). `label` names the side in errors."""

    def __init__(self, graph: onnx.GraphProto, summaries: dict[str, TensorSummary], ignore_values: bool, label: str):
        self.nodes = list(graph.node)
        self.attributes = [{a.name: attribute_value(a) for a in node.attribute} for node in self.nodes]
        self.op_keys = [(node.domain if node.domain != "ai.onnx" else "", node.op_type) for node in self.nodes]
        self.signatures = [node_signature(op, attrs) for op, attrs in zip(self.op_keys, self.attributes)]
        self.initializer_keys = {name: initializer_key(name, s, ignore_values) for name, s in summaries.items()}
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
                elif name in self.initializer_keys:
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
            raise PoprtError(f"{label}: the graph has a cycle; it is not a valid ONNX model") from None
        self.topo_index = {n: r for r, n in enumerate(self.order)}

    def source(self, node: int, slot: int) -> Source:
        row = self.sources[node]
        return row[slot] if slot < len(row) else ("absent",)

    def input_name(self, node: int, slot: int) -> str | None:
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


class NodeMatcher:
    """Pairs nodes of A and B; see the module docstring for the strategy."""

    def __init__(self, a: GraphView, b: GraphView):
        self.a, self.b = a, b
        self.b_to_a: dict[int, int] = {}
        self.a_to_b: dict[int, int] = {}
        self.forward_keys_a = self._all_forward_keys(a)
        self.backward_keys_a = self._all_backward_keys(a)

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

    def _source_key(self, side: GraphView, source: Source, keys: list[bytes]) -> tuple:
        if source[0] == "node":
            return ("node", keys[source[1]], source[2])
        if source[0] == "init":
            return ("init", side.initializer_keys[source[1]])
        return source

    def _forward_key(self, side: GraphView, node: int, keys: list[bytes]) -> bytes:
        return digest(side.signatures[node], [self._source_key(side, s, keys) for s in side.sources[node]])

    def _backward_key(self, side: GraphView, node: int, keys: list[bytes]) -> bytes:
        uses = [
            (sorted((keys[c], slot) for c, slot in readers), side.graph_outputs[node][k])
            for k, readers in enumerate(side.consumers[node])
        ]
        return digest(side.signatures[node], uses)

    def _all_forward_keys(self, side: GraphView) -> list[bytes]:
        keys = [b""] * len(side.nodes)
        for node in side.order:
            keys[node] = self._forward_key(side, node, keys)
        return keys

    def _all_backward_keys(self, side: GraphView) -> list[bytes]:
        keys = [b""] * len(side.nodes)
        for node in reversed(side.order):
            keys[node] = self._backward_key(side, node, keys)
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
        return self._walk(self.forward_keys_a, self.b.order, self._forward_key, self._similar_by_inputs if similar else None)

    def _backward_pass(self, similar: bool) -> int:
        """The same walk from the outputs back, keyed by what each node's outputs are used for."""
        return self._walk(
            self.backward_keys_a, list(reversed(self.b.order)), self._backward_key, self._similar_by_uses if similar else None
        )

    def _walk(self, a_keys: list[bytes], order: list[int], key_of, similar_to) -> int:
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

    def _source_in_a(self, source: Source) -> Source | None:
        """A B input source in A's terms, or None when its producer has no partner."""
        if source[0] != "node":
            return source
        partner = self.b_to_a.get(source[1])
        return None if partner is None else ("node", partner, source[2])

    def _most_similar(self, node: int, candidates: Iterable[int], score) -> int | None:
        """The unmatched candidate with the same op type and the highest positive score; ties go to
        the one with the same attributes, then the first in A's order."""
        best, best_rank = None, None
        for candidate in set(candidates):
            if candidate in self.a_to_b or self.a.op_keys[candidate] != self.b.op_keys[node]:
                continue
            points = score(candidate)
            if points <= 0:
                continue
            rank = (-points, self.a.signatures[candidate] != self.b.signatures[node], self.a.topo_index[candidate])
            if best_rank is None or rank < best_rank:
                best, best_rank = candidate, rank
        return best

    def _similar_by_inputs(self, node: int) -> int | None:
        """The A node of the same op type that reads most of this node's inputs at the same slots."""
        wanted = [(slot, self._source_in_a(s)) for slot, s in enumerate(self.b.sources[node])]
        wanted = [(slot, s) for slot, s in wanted if s is not None and s != ("absent",)]
        candidates = (c for slot, s in wanted for c, c_slot in self.a.readers.get(s, ()) if c_slot == slot)
        return self._most_similar(node, candidates, lambda c: sum(self.a.source(c, slot) == s for slot, s in wanted))

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
        return self._most_similar(node, candidates, lambda c: len(wanted & self.a.uses(c)))

    # Results

    def node_changes(self) -> list[NodeChange]:
        changes = []
        for a in self.a.order:
            b = self.a_to_b.get(a)
            if b is None:
                changes.append(_unmatched_node_change("removed", self.a, a))
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
        changes += [_unmatched_node_change("added", self.b, b) for b in self.b.order if b not in self.b_to_a]
        order = {"removed": 0, "added": 1, "changed": 2}
        return sorted(changes, key=lambda c: order[c.kind])

    def _rewired(self, a: int, b: int) -> tuple[InputChange, ...]:
        """Inputs that now read a tensor computed differently. An input from an added or removed
        node is not listed: that node's own entry says where it sits."""
        changes = []
        for slot in range(max(len(self.a.sources[a]), len(self.b.sources[b]))):
            source_a, source_b = self.a.source(a, slot), self._source_in_a(self.b.source(b, slot))
            if source_b is None or (source_a[0] == "node" and source_a[1] not in self.a_to_b):
                continue
            if self._rewire_key(source_a) != self._rewire_key(source_b):
                changes.append(InputChange(slot, self.a.input_name(a, slot), self.b.input_name(b, slot)))
        return tuple(changes)

    def _rewire_key(self, source: Source) -> Source:
        # Node outputs by key, not identity: of two identical Constants either one will do.
        # Initializers by name: a new value is the initializer's change, not the reader's.
        return ("node", self.forward_keys_a[source[1]], source[2]) if source[0] == "node" else source

    def doc_string_changes(self) -> list[FieldChange]:
        changes = []
        for a in self.a.order:
            b = self.a_to_b.get(a)
            if b is not None and self.a.nodes[a].doc_string != self.b.nodes[b].doc_string:
                node = self.b.nodes[b]
                name = op_name(node.domain, node.op_type)
                key = f"node {name} '{node.name}'" if node.name else f"node {name} -> {', '.join(node.output)}"
                changes.append(FieldChange("changed", key, self.a.nodes[a].doc_string, node.doc_string))
        return changes


def _pop_unmatched(candidates: list[int] | None, matched: dict[int, int]) -> int | None:
    while candidates:
        candidate = candidates.pop()
        if candidate not in matched:
            return candidate
    return None


def _unmatched_node_change(kind: str, side: GraphView, index: int) -> NodeChange:
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


def _keyed_changes(a: dict[str, Any], b: dict[str, Any], entry: Callable[[str, str, Any, Any], T]) -> list[T]:
    """`entry(kind, key, old, new)` for the keys only in `a` (removed), only in `b` (added), then in
    both with different values (changed)."""
    return (
        [entry("removed", key, value, None) for key, value in a.items() if key not in b]
        + [entry("added", key, None, value) for key, value in b.items() if key not in a]
        + [entry("changed", key, value, b[key]) for key, value in a.items() if key in b and b[key] != value]
    )


def _diff_interface(old: Sequence[onnx.ValueInfoProto], new: Sequence[onnx.ValueInfoProto]) -> list[ValueChange]:
    """Graph inputs or outputs by name, compared by `value_type`."""
    return _keyed_changes({v.name: value_type(v) for v in old}, {v.name: value_type(v) for v in new}, ValueChange)


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
    return _keyed_changes(a, b, FieldChange)


def _versions(model: onnx.ModelProto) -> dict[str, int]:
    return {"ir_version": model.ir_version} | {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}


def _function_hashes(model: onnx.ModelProto) -> dict[str, str]:
    return {f"{f.domain}::{f.name}": f"sha256:{text_hash(f)}" for f in model.functions}


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    fields = {name: getattr(model, name) for name in ("producer_name", "producer_version", "domain", "model_version")}
    return {k: v for k, v in fields.items() if v} | {p.key: p.value for p in model.metadata_props}


