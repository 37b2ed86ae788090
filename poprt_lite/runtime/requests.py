"""Checking one request against a packed artifact's interface, before it is queued or packed.

A request is one unpadded sequence: 1-D `[n]` (or `[1, n]`) feeds, int32 or int64 for integer
inputs. The dynamic input (`input_ids`) is required, 1 <= n <= the artifact's longest request;
`token_type_ids` default to zeros and `position_ids` to `position_offset + arange(n)` (the
manifest's offset, 2 for RoBERTa-like models); given position ids must be exactly that (anything
else would give a silently different answer); a feed given as None counts as omitted; `attention_mask`
may be given but must be all non-zero (the runner builds the packed mask); `unpack_info` is
ignored (the runner fills it). Any other model input ("data" role) is per token and required.

Each request is checked on its own so that a bad one fails only its own call, never a batch it
would share: ids must lie in `[0, rows)` of the embedding tables they index (an out-of-table id
makes onnxruntime fail the whole batch), and no float may be NaN or infinite (attention mixes
tokens of different requests with zero weights, and 0 * NaN is NaN).

A batch of checked requests becomes the model's feeds with `build_feeds`, and the model's outputs
are split back per request with `split_outputs`, both by the artifact's `BatchLayout`: every runner
of packed requests (the online PackRunner, the offline `ModelRunner.run_requests` and
`packing_utils.pack_data(..., artifact=...)`) goes through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from poprt_lite.errors import RequestError
from poprt_lite.runtime.interface import PackedInterface
from poprt_lite.runtime.layouts import BatchLayout, Placement
from poprt_lite.vocab import ID_ROLES, Role


@dataclass(frozen=True)
class CheckedRequest:
    length: int
    tokens: dict[str, np.ndarray]  # token input name -> [n, ...] array of the model's dtype
    outputs: dict[str, np.ndarray]  # output name -> the array this request's share is copied into


class RequestChecker:
    """Checks requests for one packed artifact (see the module docstring)."""

    def __init__(self, interface: PackedInterface) -> None:
        self.interface = interface

    def check(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray] | None) -> CheckedRequest:
        """Check one request and convert its feeds to the model's dtypes; a bad one raises RequestError."""
        n, tokens = self.tokens(feeds)
        return CheckedRequest(n, tokens, self._output_arrays(outputs, n))

    def tokens(self, feeds: Mapping[str, Any], what: str = "the request") -> tuple[int, dict[str, np.ndarray]]:
        """Check one request's feeds; its length and `[n, ...]` array per token input of the model."""
        if not isinstance(feeds, Mapping):
            raise RequestError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        for name in feeds:
            if name not in self.interface.input_roles:
                raise RequestError(
                    f"unexpected feed '{name}'; a request takes: {', '.join(self.describe_feeds())}"
                )
        if self.interface.dynamic_input not in feeds:
            raise RequestError(
                f"missing feed '{self.interface.dynamic_input}'; a request takes: {', '.join(self.describe_feeds())}"
            )
        io = self.interface
        ids = self._token_feed(io.dynamic_input, feeds[io.dynamic_input], None)
        n = len(ids)
        if n == 0:
            raise RequestError(f"{what} is empty (feed '{io.dynamic_input}' has 0 tokens)")
        if n > io.max_length:
            limit = "segment_max_size" if io.max_length == io.segment_max_size else "seq_len"
            raise RequestError(
                f"{what} has {n} tokens, more than {limit} {io.max_length} of the artifact; "
                "truncate or split it"
            )
        if io.vocab_size and ids.max() >= io.vocab_size:
            raise RequestError(f"feed '{io.dynamic_input}' has ids >= the vocabulary size {io.vocab_size}")
        tokens = {io.dynamic_input: ids}
        for name, token_input in io.token_inputs.items():
            if name == io.dynamic_input:
                continue
            if feeds.get(name) is not None:
                tokens[name] = self._token_feed(name, feeds[name], n)
                if token_input.role is Role.position_ids:
                    self._check_positions(name, tokens[name])
            elif token_input.role is Role.token_type_ids:
                tokens[name] = np.zeros(n, token_input.dtype)
            elif token_input.role is Role.position_ids:
                tokens[name] = np.arange(io.position_offset, io.position_offset + n, dtype=token_input.dtype)
            else:
                raise RequestError(f"missing feed '{name}'; a request takes: {', '.join(self.describe_feeds())}")
        if io.mask is not None and feeds.get(io.mask[0]) is not None:
            mask_name, mask_dtype = io.mask
            mask = _as_tokens(mask_name, feeds[mask_name], ())
            if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
                raise RequestError(f"feed '{mask_name}' has dtype {mask.dtype.name}; the model expects {mask_dtype.name}")
            if np.issubdtype(mask.dtype, np.inexact) and not np.isfinite(mask).all():
                raise RequestError(f"feed '{mask_name}' has NaN or infinite values")
            if len(mask) != n:
                raise RequestError(f"feed '{mask_name}' has {len(mask)} tokens; '{io.dynamic_input}' has {n}")
            if not np.all(mask):
                raise RequestError(f"feed '{mask_name}' has zeros; send each request unpadded (its real tokens only)")
        if io.unpack_info is not None and feeds.get(io.unpack_info[0]) is not None:
            info = _array(io.unpack_info[0], feeds[io.unpack_info[0]])
            if info.ndim > 1 or not np.issubdtype(info.dtype, np.integer):
                raise RequestError(
                    f"feed '{io.unpack_info[0]}' must be a 1-D integer array (it is ignored: the runner fills it)"
                )
        return n, tokens

    def _check_positions(self, name: str, positions: np.ndarray) -> None:
        """A request's own position ids must be `position_offset, position_offset + 1, ...`."""
        offset = self.interface.position_offset
        want = np.arange(offset, offset + len(positions))
        if not np.array_equal(positions, want):
            i = int(np.argmax(positions != want))
            raise RequestError(
                f"feed '{name}' has {int(positions[i])} at token {i}; a request's position ids are {offset}, "
                f"{offset + 1}, ... (the artifact's position offset is {offset}); leave them out and they are filled"
            )

    def _token_feed(self, name: str, value: Any, n: int | None) -> np.ndarray:
        role, dtype, trailing = (getattr(self.interface.token_inputs[name], f) for f in ("role", "dtype", "trailing"))
        array = _as_tokens(name, value, trailing)
        if n is not None and len(array) != n:
            raise RequestError(f"feed '{name}' has {len(array)} tokens; '{self.interface.dynamic_input}' has {n}")
        if array.dtype != dtype:
            if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.integer):
                array = cast_ids(name, array, dtype)
            elif np.issubdtype(dtype, np.floating) and np.issubdtype(array.dtype, np.floating):
                with np.errstate(over="ignore"):  # values beyond the model's type become inf: refused below
                    array = array.astype(dtype)
            else:
                raise RequestError(f"feed '{name}' has dtype {array.dtype.name}; the model expects {dtype.name}")
        if role in ID_ROLES and array.size and array.min() < 0:
            raise RequestError(f"feed '{name}' has negative values")
        id_rows = self.interface.id_rows
        if name in id_rows and array.size and array.max() >= id_rows[name]:
            raise RequestError(
                f"feed '{name}' has ids >= {id_rows[name]}, the number of rows of the embedding table it indexes"
            )
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise RequestError(f"feed '{name}' has NaN or infinite values")
        return array

    def _output_arrays(self, outputs: dict[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
        """The arrays a request's outputs are copied into: the caller's, checked, or (None or {})
        new `[n, ...]` / `[...]` arrays for every output."""
        specs = self.interface.outputs
        if outputs is None or (isinstance(outputs, Mapping) and not outputs):
            return {
                name: np.zeros((n, *out.trailing) if out.layout.per_token else out.trailing, out.dtype)
                for name, out in specs.items()
            }
        if not isinstance(outputs, Mapping):
            raise RequestError(f"outputs must be a dict of output name -> array, got {type(outputs).__name__}")
        for name, target in outputs.items():
            if name not in specs:
                raise RequestError(f"model has no output '{name}'; outputs are: {', '.join(specs)}")
            out = specs[name]
            trailing = out.trailing
            if not isinstance(target, np.ndarray):
                raise RequestError(f"output '{name}' must be a numpy array, got {type(target).__name__}")
            if not target.flags.writeable:
                raise RequestError(f"output array '{name}' is read-only")
            if not np.can_cast(out.dtype, target.dtype, casting="same_kind"):
                raise RequestError(f"output array '{name}' has dtype {target.dtype.name}; the model gives {out.dtype.name}")
            if out.layout.per_token:
                ok = target.ndim == 1 + len(trailing) and target.shape[0] >= n and _fits(target.shape[1:], trailing)
                want = f"[>={n}{''.join(f', {d}' for d in trailing)}] (e.g. [max_seq_len{''.join(f', {d}' for d in trailing)}])"
            else:
                ok = target.ndim == len(trailing) and _fits(target.shape, trailing)
                want = f"[{', '.join(map(str, trailing))}] (one per request)"
            if not ok:
                raise RequestError(f"output array '{name}' has shape {list(target.shape)}; it must be {want}")
        return outputs if isinstance(outputs, dict) else dict(outputs)

    def describe_feeds(self) -> list[str]:
        described = []
        for name, role in self.interface.input_roles.items():
            if role is Role.unpack_info:
                described.append(f"{name} (optional, ignored)")
            else:
                described.append(f"{name} (optional)" if self.interface.is_optional(name) else name)
        return described


def build_feeds(
    interface: PackedInterface, layout: BatchLayout, tokens: Sequence[Mapping[str, np.ndarray]], placement: Placement
) -> dict[str, np.ndarray]:
    """The model's feeds for a batch: each request's tokens (`tokens[i]`, checked) at its place in
    `placement`, and the attention mask and unpack_info as the layout builds them."""
    feeds = {
        name: layout.scatter(placement, np.concatenate([t[name] for t in tokens]), token_input.dtype)
        for name, token_input in interface.token_inputs.items()
    }
    if interface.mask is not None:
        feeds[interface.mask[0]] = layout.mask(placement, interface.mask[1])
    if interface.unpack_info is not None:
        feeds[interface.unpack_info[0]] = layout.unpack_info(placement, interface.unpack_info[1])
    return feeds


def split_outputs(
    interface: PackedInterface, layout: BatchLayout, results: Mapping[str, np.ndarray], placement: Placement
) -> list[dict[str, np.ndarray]]:
    """Each request's share of every output in `results` (views), in slot order: `[n, ...]` per
    token, `[...]` per request."""
    shares = {name: layout.split(out, interface.outputs[name].layout, placement) for name, out in results.items()}
    return [{name: parts[i] for name, parts in shares.items()} for i in range(len(placement))]


def cast_ids(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Integer ids to the model's integer type (PopRT feeds int32), refusing values it cannot hold."""
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise RequestError(f"feed '{name}' has values outside the range of {dtype.name}")
    return array.astype(dtype)


def _as_tokens(name: str, value: Any, trailing: tuple) -> np.ndarray:
    """A request's feed as `[n, *trailing]`, accepting a leading batch axis of 1."""
    array = _array(name, value)
    if array.ndim == len(trailing) + 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != len(trailing) + 1 or not _fits(array.shape[1:], trailing):
        want = "[n" + "".join(f", {d}" for d in trailing) + "]"
        raise RequestError(f"feed '{name}' has shape {list(array.shape)}; a request's '{name}' is {want} or [1, {want[1:]}")
    return array


def _array(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # a ragged list, or an object numpy cannot convert
        raise RequestError(f"feed '{name}' is a ragged or non-numeric sequence; pass a numpy array") from None



def _fits(shape: tuple, dims: tuple) -> bool:
    return len(shape) == len(dims) and all(not isinstance(d, int) or d == s for s, d in zip(shape, dims))

