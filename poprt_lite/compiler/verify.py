"""Numerical checks of a converted model against its source on onnxruntime (`--check`).

A packed model is checked the way it is meant to be used: random requests go through the offline
runner of its artifact (`ModelRunner.run_requests`: packed, run, split per request by each output's
layout) and every request is compared with the source model run on that request alone, unpadded.

`check` makes it a gate: the largest difference against a tolerance (`DEFAULT_ATOL` per precision),
and every output of one model present in the other (an output the conversion dropped or added is a
failure naming it, not an output left uncompared); a model that cannot even be run is a one-line
PoprtError, never an internal error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort

from poprt_lite import ir, vocab
from poprt_lite.ir import artifact
from poprt_lite.errors import PoprtError, one_line, option
from poprt_lite.runtime.packing_utils import PackedBatch, pack_data
from poprt_lite.runtime.model_runner import ModelRunner
from poprt_lite.runtime.session import create_session
from poprt_lite.runtime.interface import read_packed_interface
from poprt_lite.vocab import INPUT_IDS, UNPACK_INFO, MetaKey, Role

DEFAULT_DYNAMIC = {0: 2, 1: 16}  # batch 2, sequence 16 where a dim is not fixed
# The largest max abs difference `check` accepts by default: fp32 runs differ from the source by
# summation order only (1e-6 on the test models); fp16 rounds every weight and activation to 11
# significant bits (4e-3 on the test models, ~1e-2 on BERT-base logits); int8 quantizes every
# MatMul's weights and activations to 8 bits (up to 4.2e-2 on the test models' logits and hidden
# states, token_stream).
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 5e-2, "int8": 1e-1}


@dataclass(frozen=True)
class CheckReport:
    """`check`'s result: the max abs difference per output, the tolerance it was held to, and the
    output one model has and the other lacks, if any (`unmatched_output`)."""

    diffs: dict[str, float]
    atol: float
    unmatched: str | None = None

    @property
    def worst(self) -> float:
        return float(np.max(list(self.diffs.values()))) if self.diffs else 0.0  # NaN propagates

    @property
    def passed(self) -> bool:
        return self.unmatched is None and self.worst <= self.atol  # NaN fails

    @property
    def failure(self) -> str:
        """Why the check failed, in one line ('' if it passed)."""
        if self.unmatched is not None:
            return self.unmatched
        return "" if self.passed else f"max abs diff {self.worst:.3g} > atol {self.atol:g}"

    def lines(self) -> list[str]:
        verdict = f"ok: max abs diff {self.worst:.3g} <= atol {self.atol:g}" if self.passed else f"FAILED: {self.failure}"
        return [f"check: {name} max abs diff {diff:.3g}" for name, diff in self.diffs.items()] + [f"check: {verdict}"]


def check(
    source: onnx.ModelProto | str | os.PathLike,
    converted: onnx.ModelProto | str | os.PathLike,
    atol: float | None = None,
    seed: int = 0,
    packed: str | os.PathLike | None = None,
    *,
    removed: Sequence[str] = (),
    added: Sequence[str] = (),
) -> CheckReport:
    """`max_abs_diff` held to `atol` (default: `DEFAULT_ATOL` of the converted model's precision),
    and the outputs paired by name (`unmatched_output`; `removed` / `added`: the outputs the
    conversion was asked to remove, remove_outputs, or add, checkpoints). A failure to run either
    model is a PoprtError naming it, never an internal error."""
    try:
        converted_graph = _graph_of(converted)
        precision = ir.get_metadata(converted_graph).get(MetaKey.precision.value, "fp32")
    except Exception as exc:
        raise PoprtError(f"check could not read the converted model: {one_line(exc)}") from exc
    if atol is None:
        atol = DEFAULT_ATOL.get(precision, DEFAULT_ATOL["fp32"])
    if not atol >= 0:
        raise PoprtError(f"check_atol must be a non-negative number, got {atol}")
    try:
        unmatched = unmatched_output(_graph_of(source), converted_graph, removed, added)
        if unmatched is not None:
            return CheckReport({}, float(atol), unmatched)
        diffs = max_abs_diff(source, converted, seed, packed)
    except PoprtError as exc:
        raise PoprtError(f"check could not run the models: {exc}") from exc
    except Exception as exc:  # onnxruntime or a layout this check does not know: still one line
        raise PoprtError(f"check could not run the models: {one_line(exc)}") from exc
    return CheckReport(diffs, float(atol))


def unmatched_output(
    source: onnx.ModelProto, converted: onnx.ModelProto, removed: Sequence[str] = (), added: Sequence[str] = ()
) -> str | None:
    """Which output one model has and the other lacks, as a one-line failure (None: they pair one
    to one by name), leaving out the source outputs in `removed` and the converted ones in `added`.
    `max_abs_diff` compares the outputs both have, so an unpaired one would go unnoticed."""
    source_names = [v.name for v in source.graph.output if v.name not in removed]
    converted_names = [v.name for v in converted.graph.output if v.name not in added]
    lacking = next((name for name in source_names if name not in converted_names), None)
    if lacking is not None:
        return (
            f"the converted model lacks output '{lacking}', which the source model has "
            f"(to drop it on purpose: {option('remove_outputs')} {lacking})"
        )
    extra = next((name for name in converted_names if name not in source_names), None)
    if extra is not None:
        return (
            f"the converted model has output '{extra}', which the source model lacks "
            f"(to add an intermediate tensor on purpose: {option('checkpoints')} {extra})"
        )
    return None


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    return create_session(model, threads)


def _graph_of(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The model itself, or the model file read without its external data (interface and metadata)."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a BERT-like model: one padded batch with real-looking token ids, masks and positions.

    Row b holds a request of length S - b (at least 1); position ids restart per row.
    """
    rng = np.random.default_rng(seed)
    meta = ir.get_metadata(model)
    vocab_rows = vocab.int_of(meta, MetaKey.vocab_size, 100)
    offset = vocab.int_of(meta, MetaKey.position_offset)
    feeds = {}
    shapes = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else DEFAULT_DYNAMIC.get(i, 2) for i, d in enumerate(value.type.tensor_type.shape.dim)]
        shapes[value.name] = dims
    batch, seq = next(iter(shapes.values()))[:2]
    lengths = np.maximum(seq - np.arange(batch), 1)
    real = np.arange(seq)[None, :] < lengths[:, None]
    for value in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = shapes[value.name]
        name = value.name
        role = vocab.role_of(meta, name)
        if role is Role.attention_mask:
            data = real.astype(dtype)
        elif role is Role.position_ids:
            data = np.where(real, np.arange(seq)[None, :] + offset, 0)
        elif role is Role.token_type_ids:
            data = rng.integers(0, 2, shape) * real
        elif np.issubdtype(dtype, np.integer):
            # Token ids >= 3 avoid the special ids (padding 0 or 1) that change RoBERTa's positions.
            data = np.where(real, rng.integers(3, vocab_rows, shape), 0)
        else:
            data = rng.standard_normal(shape)
        feeds[name] = np.asarray(data, dtype=dtype).reshape(shape)
    return feeds


def max_abs_diff(
    source: onnx.ModelProto | str | os.PathLike,
    converted: onnx.ModelProto | str | os.PathLike,
    seed: int = 0,
    packed: str | os.PathLike | None = None,
) -> dict[str, float]:
    """The largest absolute difference per output both models have (paired by name), between source
    and converted model, over real tokens. Either may be a path, e.g. for models whose weights are
    external data (over 2 GB). A packed model runs through its artifact: `packed` (a written one),
    else one built in memory."""
    converted_graph = _graph_of(converted)
    if vocab.pack_spec_of(ir.get_metadata(converted_graph)) is not None:
        return _packed_max_abs_diff(source, converted, converted_graph, seed, packed)
    feeds = random_feeds(converted_graph, seed)
    source_graph = _graph_of(source).graph
    source_inputs = {v.name for v in source_graph.input}
    source_outputs = {v.name for v in source_graph.output}
    names = [v.name for v in converted_graph.graph.output if v.name in source_outputs]
    expected = session(source).run(names, {k: v for k, v in feeds.items() if k in source_inputs})
    actual = session(converted).run(names, feeds)
    meta = ir.get_metadata(converted_graph)
    mask = next((v for k, v in feeds.items() if vocab.role_of(meta, k) is Role.attention_mask), None)
    diffs = {}
    for name, want, got in zip(names, expected, actual, strict=True):
        delta = np.abs(want.astype(np.float64) - got.astype(np.float64))
        if mask is not None and delta.shape[:2] == mask.shape:
            delta = delta[mask.astype(bool)]
        diffs[name] = float(delta.max()) if delta.size else 0.0
    return diffs


def make_requests(rng: np.random.Generator, lengths, vocab_rows: int) -> list[dict[str, np.ndarray]]:
    """Unpadded requests `[1, n]`; token ids avoid the special ids 0-2."""
    return [
        {
            INPUT_IDS: rng.integers(3, vocab_rows, (1, n), dtype=np.int64),
            Role.attention_mask.value: np.ones((1, n), np.int64),
            Role.token_type_ids.value: rng.integers(0, 2, (1, n), dtype=np.int64),
        }
        for n in lengths
    ]


def run_packed(
    converted: onnx.ModelProto, requests: list[dict[str, np.ndarray]], packed_session: ort.InferenceSession | None = None
) -> tuple[PackedBatch, list[list[np.ndarray]]]:
    """Pack `requests` (as many as fit, in order) for the packed model `converted`, run it, and
    return the batch and, per packed request, its outputs cut out by each output's layout."""
    meta = ir.get_metadata(converted)
    interface = read_packed_interface(artifact.manifest_only(converted))  # the batch geometry a runner reads
    inputs = {v.name: v for v in converted.graph.input}
    dataset = [
        SimpleNamespace(
            input_ids=r[INPUT_IDS][0],
            token_type_ids=r[Role.token_type_ids][0],
            position_ids=None,
            input_len=r[INPUT_IDS].shape[1],
        )
        for r in requests
    ]
    batch = pack_data(
        dataset,
        0,
        interface.batch_size,
        interface.seq_len,
        interface.max_valid_num,
        position_offset=interface.position_offset,
        segment_max_size=interface.segment_max_size,
        mode=interface.mode,
        dynamic_rows=interface.dynamic_rows,
    )
    feeds = {name: batch.data[name] for name in inputs if name in batch.data}
    if UNPACK_INFO in inputs:
        feeds[UNPACK_INFO] = batch.unpack_info
    feeds = {k: v.astype(onnx.helper.tensor_dtype_to_np_dtype(inputs[k].type.tensor_type.elem_type)) for k, v in feeds.items()}
    outputs = (packed_session or session(converted)).run(None, feeds)
    placement = batch.placement
    shares = [batch.layout.split(out, vocab.layout_of(meta, v.name), placement) for v, out in zip(converted.graph.output, outputs)]
    return batch, [list(per_output) for per_output in zip(*shares)]


def _in_memory(converted, converted_graph: onnx.ModelProto) -> artifact.Artifact:
    """The artifact of a converted model given as a ModelProto or a file (weights included)."""
    model = converted if isinstance(converted, onnx.ModelProto) else ir.load_model(converted)
    return artifact.in_memory(Path("<converted model>"), model, artifact.converted_fields(converted_graph, b""))


def _packed_max_abs_diff(source, converted, converted_graph: onnx.ModelProto, seed: int, packed=None) -> dict[str, float]:
    meta = ir.get_metadata(converted_graph)
    runner = ModelRunner(packed if packed is not None else _in_memory(converted, converted_graph), threads=0)
    interface = runner.packed_interface("check")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, interface.max_length + 1, interface.max_valid_num)
    requests = make_requests(rng, lengths, vocab.int_of(meta, MetaKey.vocab_size, 100))
    names = set(interface.input_roles)
    answers = runner.run_requests([{k: v for k, v in r.items() if k in names} for r in requests])
    source_session = session(source)
    source_inputs = {i.name for i in source_session.get_inputs()}
    source_outputs = {o.name for o in source_session.get_outputs()}
    diffs = {name: 0.0 for name in interface.outputs if name in source_outputs}
    for request, got in zip(requests, answers, strict=True):
        want = source_session.run(list(diffs), {k: v for k, v in request.items() if k in source_inputs})
        for name, w in zip(diffs, want, strict=True):
            delta = float(np.abs(w[0].astype(np.float64) - got[name].astype(np.float64)).max())
            diffs[name] = float(np.maximum(diffs[name], delta))  # NaN propagates: a NaN answer fails
    return diffs
