"""ModelRunner: run an artifact's fixed-shape model on onnxruntime, with every feed checked first.

On a packed artifact the feeds are also checked against the manifest's packing (`check_packed_feeds`):
where the requests lie is read back from the attention mask (and unpack_info) by the artifact's
`BatchLayout`, and each request's position ids must restart at the manifest's offset, so that feeds
packed for the other mode, with the wrong offset or with a wrong unpack_info are refused instead of
giving plausible wrong numbers. `run_requests` / `iter_requests` pack unpadded requests themselves
(`runtime/offline.py`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from poprt_lite import vocab
from poprt_lite.ir.artifact import Artifact, load_artifact
from poprt_lite.errors import PoprtError, RequestError, option
from poprt_lite.runtime import offline
from poprt_lite.runtime.interface import PackedInterface, read_packed_interface
from poprt_lite.runtime.packing import PackAlgorithm
from poprt_lite.runtime.requests import cast_ids
from poprt_lite.runtime.session import artifact_session
from poprt_lite.vocab import ID_ROLES, MetaKey, Role


class ModelRunner:
    """Runs a compiled artifact. `threads=0` lets onnxruntime use every core; `spinning=False` stops
    its threads from busy-waiting after each run (when other sessions or threads need the cores)."""

    def __init__(self, source: str | os.PathLike | Artifact, threads: int = 0, *, spinning: bool = True) -> None:
        self.artifact = source if isinstance(source, Artifact) else load_artifact(source)
        self.manifest = self.artifact.manifest
        packed = vocab.manifest_pack_spec(self.manifest) is not None
        self.interface: PackedInterface | None = read_packed_interface(self.artifact) if packed else None
        self.session = artifact_session(self.artifact, threads, spinning=spinning)
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

    def run_requests(
        self,
        requests: Sequence[Mapping[str, Any]],
        *,
        algorithm: PackAlgorithm | str | None = None,
        progress: bool = False,
    ) -> list[dict[str, np.ndarray]]:
        """Pack unpadded requests into this packed artifact's batches, run them, and return each
        request's outputs in order: `{output name: [n, ...]}` for per-token outputs, `[...]` for
        per-request ones.

        A request is a dict of 1-D feeds of its own length, as `PackRunner.execute` takes:
        `input_ids` required; `token_type_ids` (zeros), `position_ids` (the manifest's offset + 0, 1,
        ...), `attention_mask` and `unpack_info` optional. The packing is planned over all the
        requests at once (by default `best_fit_decreasing`, the fewest batches, and for token_stream
        artifacts `longest_first`, batches of similar lengths; `first_fit` / `next_fit` keep PopRT's
        in-order batches); `progress=True` shows a progress bar on stderr."""
        return offline.run_requests(self, requests, algorithm=algorithm, progress=progress)

    def iter_requests(
        self,
        requests: Iterable[Mapping[str, Any]] | str | os.PathLike,
        *,
        algorithm: PackAlgorithm | str | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """`run_requests` for long or streamed inputs: yields each request's outputs in order, packing
        a few batches' worth of requests at a time. `requests` is any iterable of request dicts or
        the path of a JSON Lines file (one request per line, `{"input_ids": [...], ...}`)."""
        return offline.iter_requests(self, requests, algorithm=algorithm, progress=progress, total=total)

    def packed_interface(self, what: str) -> PackedInterface:
        """The packed artifact's interface; a plain (unpacked) artifact raises PoprtError for `what`."""
        if self.interface is None:
            raise PoprtError(
                f"{what} packs requests, but artifact '{self.artifact.path}' is not packed (compiled without "
                "pack_args); run padded batches with run()"
            )
        return self.interface

    def execute(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """PopRT's calling convention: fill the caller's `outputs` arrays in place (checked first) and
        return them; with no `outputs`, every output is returned in new arrays."""
        if not outputs:
            return dict(zip(self.output_names, self.run(None, feeds)))
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
        return outputs

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate names, dtypes, shapes and values against the manifest; cast int32/int64 ids to the
        model's type. Token ids must lie in the vocabulary (`vocab_size`), no id may be negative (onnxruntime's
        Gather would silently wrap it), other ids must lie in the embedding table they index
        (`table_rows`), float feeds must be finite, and packed feeds must follow the artifact's
        packing (`check_packed_feeds`)."""
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
        if self.interface is not None:
            check_packed_feeds(self.interface, arrays)
        return arrays


def check_packed_feeds(interface: PackedInterface, arrays: Mapping[str, np.ndarray]) -> None:
    """Packed feeds must be what the artifact's layout builds: the requests are read back from the
    attention mask (and unpack_info), each must fit (`segment_max_size`, `max_valid_num`, the batch),
    and its position ids must be the manifest's offset, offset + 1, ... Raises a one-line RequestError."""
    layout = interface.layout
    rows = arrays[interface.dynamic_input].shape[0]
    if interface.dynamic_rows and rows > interface.batch_size:
        raise RequestError(
            f"feed '{interface.dynamic_input}' has {rows} rows, more than the {interface.batch_size} rows of the "
            f"artifact ({option('input_shape')}); send at most that many"
        )
    mask_name = interface.mask[0] if interface.mask else vocab.Role.attention_mask.value
    info_name = interface.unpack_info[0] if interface.unpack_info else vocab.UNPACK_INFO
    info = arrays.get(info_name) if interface.unpack_info else None
    if info is not None:
        limit, flat = interface.segment_max_size, info.reshape(-1)
        if info.ndim == 1 and len(flat) > interface.max_valid_num:
            raise RequestError(
                f"feed '{info_name}' holds {len(flat)} requests, more than max_valid_num {interface.max_valid_num} "
                "of the artifact; send fewer per batch"
            )
        if flat.max() > limit:
            i = int(np.argmax(flat > limit))
            raise RequestError(
                f"feed '{info_name}' holds a request of {int(flat[i])} tokens ({info_name}[{i}]), "
                f"more than segment_max_size {limit} of the artifact; truncate or split it"
            )
        shape = arrays[interface.dynamic_input].shape
        if int(flat.sum()) > int(np.prod(shape)):
            raise RequestError(
                f"feed '{info_name}' holds {int(flat.sum())} tokens, more than the {int(np.prod(shape))} token slots of "
                f"the batch ({shape[0]}x{shape[1]})"
            )
    mask = arrays.get(mask_name) if interface.mask else None
    placement = layout.read_placement(mask, info, (mask_name, info_name))
    if len(placement) > interface.max_valid_num:
        raise RequestError(
            f"the feeds hold {len(placement)} requests ({mask_name} segments), more than max_valid_num "
            f"{interface.max_valid_num} of the artifact"
        )
    if len(placement) and placement.lengths.max() > interface.max_length:
        i = int(np.argmax(placement.lengths > interface.max_length))
        raise RequestError(
            f"request {i} of the feeds (at {layout.locate(placement.starts[i])}) has {int(placement.lengths[i])} tokens, "
            f"more than segment_max_size {interface.max_length} of the artifact; truncate or split it"
        )
    for name, token_input in interface.token_inputs.items():
        if token_input.role is Role.position_ids:
            _check_positions(interface, name, arrays[name], placement)


def _check_positions(interface: PackedInterface, name: str, positions: np.ndarray, placement) -> None:
    """Each request's position ids restart at the manifest's offset: offset, offset + 1, ..."""
    layout, offset = interface.layout, interface.position_offset
    got = positions.reshape(-1)[placement.destinations].astype(np.int64)
    if np.array_equal(got, layout.positions(placement, offset)):
        return
    within = placement.within
    request = np.repeat(np.arange(len(placement)), placement.lengths)
    jumps = np.flatnonzero((within[1:] > 0) & (got[1:] != got[:-1] + 1)) + 1
    if jumps.size:
        t = int(jumps[0])
        i = int(request[t])
        where = layout.locate(placement.destinations[t])
        raise RequestError(
            f"feed '{name}' jumps from {int(got[t - 1])} to {int(got[t])} at {where}, inside request {i} of the feeds "
            f"({placement.lengths[i]} tokens from {layout.locate(placement.starts[i])}, as {layout.delimited_by} place it): "
            f"{layout.misplaced}"
        )
    t = int(np.argmax(got != layout.positions(placement, offset)))
    i = int(request[t])
    raise RequestError(
        f"feed '{name}' starts request {i} (at {layout.locate(placement.starts[i])}) at {int(got[t])}; the artifact's "
        f"position ids start at {offset} for each request: pack with position_offset={offset} "
        "(pack_data(..., artifact=...) reads it from the artifact)"
    )


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
