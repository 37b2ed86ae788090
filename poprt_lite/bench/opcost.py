"""What the packing ops and the unpacked attention cost, timed alone at the model's shapes.

For every `ai.graphcore` node of the static packed models (Unpack, Repack, PaddingMask, AttentionMask;
token_stream models, whose shapes follow each batch, are left out) the op is run alone in onnxruntime, with the same thread count, on inputs of the node's static shape
(and the lengths of a real batch of the benchmark); the time per call times the number of calls
per batch, divided by the mode's model time per batch, is the op's share of the model.

The attention core (Q/K/V head transposes, Q.K^T, scale, mask, softmax, P.V, context transpose)
is timed the same way at the packed shape (`[batch, heads, seq, head_dim]`, AttentionMask mode
and padded) and the unpacked one (`[max_valid_num, heads, segment_max_size, head_dim]`,
unpack/repack mode): the difference, times the layers, is what unpacking costs beyond the ops.

`profile_by_op_type` sums onnxruntime's own profile of whole models by op type (the benchmarks/
scripts that compare graph forms and ways of serving use it).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from poprt_lite import ops
from poprt_lite.runtime.session import DISABLED_OPTIMIZERS, create_session, session_options
from poprt_lite.runtime import modes
from poprt_lite.vocab import Layout


def profile_by_op_type(
    model, feeds_list: Sequence[dict[str, np.ndarray]], threads: int = 0, runs: int = 3,
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
) -> dict[str, float]:
    """Op type -> milliseconds of node time per pass over `feeds_list` (one run per feeds), from
    onnxruntime's profiler: a warm-up pass, then the mean of `runs` passes."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads, spinning=False)  # as the bench's sessions
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = create_session(model, options=options, disabled_optimizers=disabled_optimizers)
        for _ in range(runs + 1):
            for feeds in feeds_list:
                session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after = starts[len(feeds_list)] if len(starts) > len(feeds_list) else 0  # past the warm-up pass
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= after:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(by_op)


def time_interleaved(
    ways: dict[str, tuple[Any, list[dict[str, np.ndarray]]]], threads: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each way's feeds through a session of its model, the ways interleaved round by round
    after one warm-up round: per way, each round's wall and this process's CPU milliseconds."""
    from poprt_lite.bench.monitor import own_cpu

    sessions = {name: create_session(model, threads, spinning=False) for name, (model, _) in ways.items()}
    wall, cpu = {name: [] for name in ways}, {name: [] for name in ways}
    for r in range(rounds + 1):
        for name, (_, feeds_list) in ways.items():
            cpu0, start = own_cpu(), time.perf_counter()
            for feeds in feeds_list:
                sessions[name].run(None, feeds)
            if r:
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((own_cpu() - cpu0) * 1e3)
    return wall, cpu


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    return create_session(model, threads)


def _time(session: ort.InferenceSession, feeds: dict[str, np.ndarray], budget: float = 0.5, repeats: int = 20) -> float:
    """Median seconds per run (after a warm-up), within about `budget` seconds."""
    session.run(None, feeds)
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _shape(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    types = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        types[v.name] = (t.elem_type, [d.dim_value for d in t.shape.dim])
    for init in model.graph.initializer:
        types[init.name] = (init.data_type, list(init.dims))
    return types


def custom_op_sites(model: onnx.ModelProto) -> Counter:
    """(op, attributes, input types, constant inputs) -> number of nodes, over the main graph."""
    types = _shape(model)
    inits = {i.name: i for i in model.graph.initializer}
    sites: Counter = Counter()
    for node in model.graph.node:
        if node.domain != ops.DOMAIN:
            continue
        attrs = tuple(sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute))
        inputs = tuple(
            (types[n][0], tuple(types[n][1]), tuple(numpy_helper.to_array(inits[n]).tolist()) if n in inits else None)
            for n in node.input
        )
        sites[(node.op_type, attrs, inputs)] += 1
    return sites


def _op_model(op: str, attrs: tuple, inputs: tuple, opset: int) -> onnx.ModelProto:
    graph_inputs, initializers, names = [], [], []
    for k, (elem, shape, const) in enumerate(inputs):
        name = f"in{k}"
        names.append(name)
        if const is not None:
            initializers.append(numpy_helper.from_array(np.asarray(const, helper.tensor_dtype_to_np_dtype(elem)).reshape(shape), name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
    node = helper.make_node(op, names, ["out"], domain=ops.DOMAIN, **dict(attrs))
    out_type = dict(attrs).get("dtype", TensorProto.FLOAT) if op in ("AttentionMask", "PaddingMask") else inputs[0][0]
    graph = helper.make_graph([node], op, graph_inputs, [helper.make_tensor_value_info("out", out_type, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    return ops.attach_functions(model)


def _attention_model(rows: int, heads: int, seq: int, head_dim: int, full_mask: bool, opset: int) -> onnx.ModelProto:
    """Token-major Q/K/V [rows, seq, heads, head_dim] -> attention -> token-major context."""
    f = TensorProto.FLOAT
    mask_shape = [rows, 1, seq, seq] if full_mask else [rows, 1, 1, seq]
    nodes = [
        helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["s"]),
        helper.make_node("Div", ["s", "scale"], ["ss"]),
        helper.make_node("Add", ["ss", "mask"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["ch"]),
        helper.make_node("Transpose", ["ch"], ["ctx"], perm=[0, 2, 1, 3]),
    ]
    tok = [rows, seq, heads, head_dim]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info(n, f, tok) for n in ("q", "k", "v")] + [helper.make_tensor_value_info("mask", f, mask_shape)],
        [helper.make_tensor_value_info("ctx", f, tok)],
        [numpy_helper.from_array(np.array(np.sqrt(head_dim), np.float32), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds_for(inputs: tuple, unpack_info: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for k, (elem, shape, const) in enumerate(inputs):
        if const is not None:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if np.issubdtype(dtype, np.floating):
            feeds[f"in{k}"] = rng.standard_normal(shape).astype(dtype)
        elif len(shape) == 1:
            feeds[f"in{k}"] = unpack_info.astype(dtype)
        else:
            feeds[f"in{k}"] = mask.astype(dtype).reshape(shape)
    return feeds


def measure_op_costs(ctx, model_ms: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Time each custom op of the packed artifacts alone (on the first offline batch of its mode)
    and the attention core at the packed and unpacked shapes; `model_ms`: pack mode -> mode name ->
    model ms per batch, for each op's share of the model."""
    c, threads = ctx.config, ctx.config.n_threads
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"ops": [], "attention": {}}
    heads = head_dim = layers = None
    for kind in (k for k in ctx.artifacts if k is not None and modes.get(k).static):
        model = ctx.artifacts[kind].model()
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        batch = ctx.plan(kind)[0]
        unpack_info = batch.layout.unpack_info(batch.placement, np.int64)
        mask = batch.layout.mask(batch.placement, np.int64).reshape(-1)
        batch_ms = model_ms.get(kind, {})
        total, repacks = 0.0, 0
        for (op, attrs, inputs), count in custom_op_sites(model).items():
            seconds = _time(_session(_op_model(op, attrs, inputs, opset), threads), _feeds_for(inputs, unpack_info, mask, rng))
            total += seconds * count
            if op == "Unpack" and len(inputs[0][1]) == 4:
                _, _, heads, head_dim = inputs[0][1]
            if op == "Repack":
                repacks += count
            out["ops"].append({
                "model": str(kind), "op": op, "input_shape": list(inputs[0][1]), "count_per_batch": count,
                "ms_per_call": seconds * 1e3, "ms_per_batch": seconds * count * 1e3,
                "share_of_model": {m: seconds * count * 1e3 / v for m, v in batch_ms.items()},
            })
        layers = layers or repacks or None  # one Repack per layer, of the first model that unpacks
        out.setdefault("total", {})[str(kind)] = {
            "ms_per_batch": total * 1e3, "share_of_model": {m: total * 1e3 / v for m, v in batch_ms.items()},
        }
    if heads and layers:
        att = {}
        for label, rows, full in ((Layout.packed.value, c.batch_size, True), (Layout.unpacked.value, c.max_valid_num, False)):
            model = _attention_model(rows, heads, c.max_seq_len, head_dim, full, 17)
            tok = rng.standard_normal((rows, c.max_seq_len, heads, head_dim)).astype(np.float32)
            mask_shape = (rows, 1, c.max_seq_len, c.max_seq_len) if full else (rows, 1, 1, c.max_seq_len)
            feeds = {"q": tok, "k": tok, "v": tok, "mask": np.zeros(mask_shape, np.float32)}
            ms = _time(_session(model, threads), feeds, budget=1.0, repeats=7) * 1e3
            att[label] = {"row_count": rows, "ms_per_layer": ms, "ms_per_batch": ms * layers}
        att["layers"] = layers
        att["extra_ms_per_batch_unpacked"] = att[Layout.unpacked.value]["ms_per_batch"] - att[Layout.packed.value]["ms_per_batch"]
        out["attention"] = att
    return out
