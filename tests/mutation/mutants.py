"""Mutants of the converter, for tests/mutation/test_mutations.py: each is a pass appended to every
pipeline it applies to, so that every converted model the tests make carries the fault.

Loaded into a pytest run as a plugin (`-p mutation.mutants`, with tests/ on PYTHONPATH) that reads
the mutant's name from POPRT_LITE_MUTANT; without it the plugin changes nothing (the control run).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from poprt_lite import compiler
from poprt_lite.passes import Pass, PassContext, PassResult

TOKEN = 3  # the token a mutant changes: the 4th of the batch, in the first request of every test batch
DELTA = 0.05  # the fp16 mutant's error on that token: 25x float16's largest error on the test models


def _plus_at_token(graph: gs.Graph, tensor: gs.Variable, value: np.ndarray, prefix: str) -> gs.Variable:
    """A new tensor: `tensor` with `value` (a scalar array of its own dtype) added to its TOKEN-th
    element (row-major), whatever its shape."""
    names = itertools.count()

    def const(array) -> gs.Constant:
        return gs.Constant(f"{prefix}_const{next(names)}", np.asarray(array))

    def node(op: str, *inputs, **attrs) -> gs.Variable:
        out = gs.Variable(f"{prefix}_{next(names)}")
        graph.nodes.append(gs.Node(op, inputs=list(inputs), outputs=[out], attrs=attrs))
        return out

    def elem_type(dtype) -> int:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    flat = node("Reshape", tensor, const(np.array([-1], np.int64)))
    ones = node("ConstantOfShape", node("Shape", flat), value=onnx.numpy_helper.from_array(np.ones(1, np.int64)))
    hit = node("Equal", node("CumSum", ones, const(np.int64(0))), const(np.int64(TOKEN + 1)))
    delta = node("Mul", node("Cast", hit, to=elem_type(value.dtype)), const(value))
    if value.dtype != np.dtype(tensor.dtype):
        delta = node("Cast", delta, to=elem_type(tensor.dtype))
    return node("Reshape", node("Add", flat, delta), node("Shape", tensor))


class DropOutput(Pass):
    """The converted model loses its last output (models with two or more)."""

    name = "mutant_drop_output"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if len(graph.outputs) < 2:
            return PassResult(False)
        graph.outputs.pop()
        return PassResult(True)


class ShiftPosition(Pass):
    """One token's position id is one more than it should be (models with a position_ids input)."""

    name = "mutant_shift_position"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        (positions,) = [v for v in graph.inputs if v.name == "position_ids"] or [None]
        if positions is None:
            return PassResult(False)
        readers = list(positions.outputs)
        shifted = _plus_at_token(graph, positions, np.asarray(1, positions.dtype), "mutant_position")
        for node in readers:
            node.inputs = [shifted if v is positions else v for v in node.inputs]
        return PassResult(True)


class CorruptHalfToken(Pass):
    """A float16 model's first output is DELTA (a float16) off at one token."""

    name = "mutant_corrupt_fp16_token"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        output = graph.outputs[0]
        producer = output.inputs[0]
        inner = gs.Variable("mutant_clean_output", dtype=output.dtype, shape=output.shape)
        producer.outputs[producer.outputs.index(output)] = inner
        corrupted = _plus_at_token(graph, inner, np.asarray(DELTA, np.float16), "mutant_fp16")
        graph.nodes.append(gs.Node("Identity", inputs=[corrupted], outputs=[output]))
        return PassResult(True)


MUTANTS = {  # name -> (the pass, whether it applies to a conversion with these options)
    "drop_output": (DropOutput, lambda options: options.pack is not None),
    "shift_position": (ShiftPosition, lambda options: options.pack is not None),
    "corrupt_fp16_token": (CorruptHalfToken, lambda options: options.precision == "fp16"),
}


def install(name: str) -> None:
    """Append mutant `name` to every pipeline it applies to."""
    mutant, applies = MUTANTS[name]
    build = compiler.build_pipeline

    def build_pipeline(options):
        pipeline = build(options)
        return [*pipeline, mutant()] if applies(options) else pipeline

    compiler.build_pipeline = build_pipeline


def pytest_configure(config) -> None:
    name = os.environ.get("POPRT_LITE_MUTANT")
    if name:
        install(name)
