"""ModelRunner: run an artifact's fixed-shape model on onnxruntime, with every feed checked first."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from poprt_lite.artifact import Artifact, load_artifact
from poprt_lite.errors import RequestError


class ModelRunner:
    """Runs a compiled artifact. `threads=0` lets onnxruntime use every core."""

    def __init__(self, source: str | os.PathLike | Artifact, threads: int = 0) -> None:
        self.artifact = source if isinstance(source, Artifact) else load_artifact(source)
        self.manifest = self.artifact.manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.artifact.model_bytes, options, providers=["CPUExecutionProvider"])
        self.inputs = {spec["name"]: spec for spec in self.manifest["inputs"]}
        self.outputs = {spec["name"]: spec for spec in self.manifest["outputs"]}

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """onnxruntime's calling convention: a list of arrays, in `output_names` order."""
        names = list(output_names) if output_names else self.output_names
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise RequestError(f"model has no output '{unknown[0]}'; outputs are: {', '.join(self.outputs)}")
        return self.session.run(names, self.check_feeds(feeds))

    def execute(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray]) -> None:
        """PopRT's calling convention: fill the caller's `outputs` arrays in place."""
        for name, value in zip(outputs, self.run(list(outputs), feeds)):
            target = outputs[name]
            if target.shape != value.shape:
                raise RequestError(f"output array '{name}' has shape {list(target.shape)}; the model gives {list(value.shape)}")
            target[...] = value

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate names, dtypes and shapes against the manifest; cast int32/int64 ids to the model's type."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise RequestError(f"missing feed '{missing[0]}'; the model takes: {', '.join(self.inputs)}")
        extra = [n for n in feeds if n not in self.inputs]
        if extra:
            raise RequestError(f"unexpected feed '{extra[0]}'; the model takes: {', '.join(self.inputs)}")
        return {name: conform(name, feeds[name], spec) for name, spec in self.inputs.items()}


def conform(name: str, value: Any, spec: Mapping[str, Any]) -> np.ndarray:
    """One feed, checked against its manifest entry and cast where that is lossless."""
    array = np.asarray(value)
    want = np.dtype(spec["dtype"])
    if array.dtype != want:
        if np.issubdtype(want, np.integer) and np.issubdtype(array.dtype, np.integer):
            info = np.iinfo(want)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise RequestError(f"feed '{name}' has values outside the range of {want.name}")
            array = array.astype(want)
        else:
            raise RequestError(f"feed '{name}' has dtype {array.dtype.name}; the model expects {want.name}")
    shape = spec["shape"]
    if len(array.shape) != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape)):
        expected = "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
        raise RequestError(f"feed '{name}' has shape {list(array.shape)}; the model expects {expected}")
    return array
