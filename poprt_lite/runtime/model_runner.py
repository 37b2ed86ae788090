"""ModelRunner: run an artifact's fixed-shape model on onnxruntime, with every feed checked first."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from poprt_lite.artifact import Artifact, load_artifact
from poprt_lite import vocab
from poprt_lite.errors import RequestError
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import ID_ROLES, MetaKey, PackMode, Role


class ModelRunner:
    """Runs a compiled artifact. `threads=0` lets onnxruntime use every core."""

    def __init__(self, source: str | os.PathLike | Artifact, threads: int = 0) -> None:
        self.artifact = source if isinstance(source, Artifact) else load_artifact(source)
        self.manifest = self.artifact.manifest
        self.session = create_session(self.artifact.model_bytes, threads)
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
        """PopRT's calling convention: fill the caller's `outputs` arrays in place (checked first)."""
        for name, target in outputs.items():
            spec = self.outputs.get(name)
            if spec is None:
                raise RequestError(f"model has no output '{name}'; outputs are: {', '.join(self.outputs)}")
            if not isinstance(target, np.ndarray) or target.dtype != np.dtype(spec["dtype"]):
                got = target.dtype.name if isinstance(target, np.ndarray) else type(target).__name__
                raise RequestError(f"output array '{name}' has dtype {got}; the model gives {spec['dtype']}")
            if any(isinstance(d, int) and d != t for d, t in zip(spec["shape"], target.shape)) or target.ndim != len(spec["shape"]):
                raise RequestError(f"output array '{name}' has shape {list(target.shape)}; the model gives {spec['shape']}")
        for name, value in zip(outputs, self.run(list(outputs), feeds)):
            target = outputs[name]
            if target.shape != value.shape:
                raise RequestError(f"output array '{name}' has shape {list(target.shape)}; the model gives {list(value.shape)}")
            target[...] = value

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate names, dtypes, shapes and values against the manifest; cast int32/int64 ids to the
        model's type. Token ids must lie in the vocabulary (`vocab_size`), no id may be negative (onnxruntime's
        Gather would silently wrap it), other ids must lie in the embedding table they index
        (`table_rows`), float feeds must be finite, and in unpack/repack and token_stream artifacts
        `unpack_info` may hold at most `max_valid_num` lengths (token_stream: one per request, its
        length is dynamic), each at most `segment_max_size`, fitting the batch's tokens."""
        if not isinstance(feeds, Mapping):
            raise RequestError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise RequestError(f"missing feed '{missing[0]}'; the model takes: {', '.join(self.inputs)}")
        extra = [n for n in feeds if n not in self.inputs]
        if extra:
            raise RequestError(f"unexpected feed '{extra[0]}'; the model takes: {', '.join(self.inputs)}")
        arrays = {name: conform(name, feeds[name], spec) for name, spec in self.inputs.items()}
        vocab_size = vocab.int_of(self.manifest, MetaKey.vocab_size)
        pack = vocab.manifest_pack_spec(self.manifest)
        for name, spec in self.inputs.items():
            role, array = vocab.spec_role(spec), arrays[name]
            if not np.issubdtype(array.dtype, np.integer):
                continue
            if role in (*ID_ROLES, Role.unpack_info) and array.min() < 0:
                raise RequestError(f"feed '{name}' has negative values")
            if role is Role.dynamic_input and vocab_size and array.max() >= vocab_size:
                raise RequestError(f"feed '{name}' has ids >= the vocabulary size {vocab_size}")
            rows = spec.get("table_rows")
            if role is not Role.dynamic_input and rows and array.max() >= rows:
                raise RequestError(f"feed '{name}' has ids >= {rows}, the number of rows of the embedding table it indexes")
            if role is Role.unpack_info and pack is not None and pack.mode in (PackMode.unpack_repack, PackMode.token_stream):
                if array.ndim == 1 and len(array) > pack.max_valid_num:
                    raise RequestError(
                        f"feed '{name}' holds {len(array)} requests, more than max_valid_num {pack.max_valid_num} "
                        "of the artifact; send fewer per batch"
                    )
                limit = pack.segment_max_size
                if array.max() > limit:
                    i = int(np.argmax(array.reshape(-1) > limit))
                    raise RequestError(
                        f"feed '{name}' holds a request of {int(array.reshape(-1)[i])} tokens ({name}[{i}]), "
                        f"more than segment_max_size {limit} of the artifact; truncate or split it"
                    )
                dynamic = [n for n, s in self.inputs.items() if vocab.spec_role(s) is Role.dynamic_input]
                shape = arrays[dynamic[0]].shape if dynamic else ()
                slots = int(np.prod(shape[:2])) if len(shape) >= 2 else None
                if slots is not None and int(array.sum()) > slots:
                    raise RequestError(
                        f"feed '{name}' holds {int(array.sum())} tokens, more than the {slots} token slots of "
                        f"the batch ({shape[0]}x{shape[1]})"
                    )
        return arrays


def cast_ids(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Integer ids to the model's integer type (PopRT feeds int32), refusing values it cannot hold."""
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise RequestError(f"feed '{name}' has values outside the range of {dtype.name}")
    return array.astype(dtype)


def conform(name: str, value: Any, spec: Mapping[str, Any]) -> np.ndarray:
    """One feed, checked against its manifest entry and cast where that is lossless."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(f"feed '{name}' is a ragged or non-numeric sequence; pass a numpy array") from None
    want = np.dtype(spec["dtype"])
    if array.dtype != want:
        if np.issubdtype(want, np.integer) and np.issubdtype(array.dtype, np.integer):
            array = cast_ids(name, array, want)
        else:
            raise RequestError(f"feed '{name}' has dtype {array.dtype.name}; the model expects {want.name}")
    shape = spec["shape"]
    if len(array.shape) != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape)):
        expected = "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
        raise RequestError(f"feed '{name}' has shape {list(array.shape)}; the model expects {expected}")
    if array.size == 0:
        raise RequestError(f"feed '{name}' is empty (shape {list(array.shape)})")
    if np.issubdtype(want, np.inexact) and not np.isfinite(array).all():
        raise RequestError(f"feed '{name}' has NaN or infinite values")
    return array
