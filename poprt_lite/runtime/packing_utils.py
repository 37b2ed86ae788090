"""Host-side packing of requests into model inputs, mirroring PopRT's `packing_utils` module.

Scripts written for PopRT port by changing the import (`from poprt_lite import packing_utils`).
A request is any object with `input_ids`, `input_len` and optionally `token_type_ids` and
`position_ids` (1-D arrays of at least `input_len` tokens; only the first `input_len` are used).

Layouts (shared with the compiled models):

- Unpack/repack mode (`across_rows=True`): requests lie one after another in the flattened
  `batch_size * seq_len` token stream and may cross a row boundary; `attention_mask` is 1 on real
  tokens; `unpack_info[i]` is the length of request i (0 for unused slots).
- AttentionMask mode (`across_rows=False`): each request lies in one row, the requests of a row one
  after another from column 0; `attention_mask` holds segment ids 1, 2, ... for a row's requests.
- token_stream mode (`mode="token_stream"`, with `batch_size=1, seq_len=max_tokens`): requests one
  after another in one `[1, T]` stream of their T real tokens (no padding); `unpack_info` holds the
  batch's lengths only.

With `dynamic_rows=True` (artifacts compiled with `--dynamic_rows`) a batch's feeds hold only the
rows its requests use (`[rows, seq_len]`, at most `batch_size` rows), not every row.

`position_ids` restart at `position_offset` for each request; a request's own `position_ids`, if it
has them, are used as given (without the offset). A request's `attention_mask` is not read: it is
rebuilt from the lengths. Padding is 0 in every input.

With `artifact=` (a path, a loaded `Artifact` or a runner), the artifact's manifest gives what the
arguments leave out and refuses what contradicts it: the mode (`across_rows`), `position_offset`,
`segment_max_size`, and the geometry (`batch_size`, `seq_len`, `max_valid_num` must be the
artifact's). The batch's `data` then holds exactly the model's feeds, in its dtypes: token types
zero-filled when the requests have none, position ids from the artifact's offset (a request's own
must be offset, offset + 1, ...), and `unpack_info` when the model takes it. Without `artifact`, a
RoBERTa-like model's offset (2) must be passed by hand; the plain runner refuses the feeds otherwise.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poprt_lite.ir.artifact import Artifact, load_artifact
from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.runtime.interface import PackedInterface, read_packed_interface
from poprt_lite.runtime import modes
from poprt_lite.runtime.layouts import BatchLayout, PaddedRows, Placement
from poprt_lite.runtime.requests import RequestChecker, build_feeds
from poprt_lite.runtime.packing import OnlinePacker, PackAlgorithm, check_length
from poprt_lite.vocab import INPUT_IDS, Layout, Role

ATTENTION_MASK = Role.attention_mask.value
TOKEN_TYPE_IDS = Role.token_type_ids.value
POSITION_IDS = Role.position_ids.value


@dataclass(frozen=True)
class RequestSpec:
    """Where request `datasets[index]` lies in a batch: its first token is at `[row, offset]`."""

    index: int
    row: int
    offset: int
    length: int


@dataclass
class PackedBatch:
    """One model batch: `data` feeds, `unpack_info`, one spec per request, the next index, and the
    batch layout its feeds follow."""

    data: dict[str, np.ndarray]
    unpack_info: np.ndarray
    specs: list[RequestSpec]
    count: int
    seq_len: int
    layout: BatchLayout | None = None

    @property
    def placement(self) -> Placement:
        """Where the batch's requests lie (lengths and flat token offsets), in slot order."""
        return Placement.of([s.length for s in self.specs], [s.row * self.seq_len + s.offset for s in self.specs])


def pack_data(
    datasets: Sequence,
    index: int,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    segment_num: int = 1,
    across_rows: bool | None = None,
    position_offset: int | None = None,
    *,
    algorithm: PackAlgorithm | str | None = None,
    segment_max_size: int | None = None,
    mode: str | None = None,
    dynamic_rows: bool | None = None,
    artifact: str | os.PathLike | Artifact | Any | None = None,
) -> PackedBatch:
    """Pack requests `datasets[index:]`, in order, into one batch until the next one doesn't fit.

    `mode` is the artifact's pack mode; by default `across_rows` chooses unpack_repack (True) or
    attention_mask (False). token_stream takes `batch_size=1, seq_len=max_tokens`: requests are
    taken while their tokens fit `max_tokens` and their count `max_valid_num`, and the batch's feeds
    are `[1, T]`, T its real tokens. `dynamic_rows`: the feeds hold only the rows the batch uses.

    AttentionMask mode: the default, `next_fit`, fills the rows in order, so the requests of the
    batch lie row by row in dataset order and code that splits the outputs row by row by segment
    id, as PopRT's packed_bert_example does, gets them back in dataset order. With `first_fit` a
    request goes to the first row with room for it, so a short request may land in an earlier row
    than its predecessor (more requests per batch); packing still stops at the first request that
    fits in no row, so each batch takes a contiguous run of `datasets`, and `specs` and
    `unpack_outputs` follow dataset order either way.
    Unpack/repack mode: one stream of `batch_size * seq_len` tokens (both algorithms place requests
    one after another); requests may have up to `segment_max_size` tokens (default `seq_len`).
    `segment_num` exists for PopRT compatibility; PopRT's guide only ever passes 1 and does not
    document other values, so poprt-lite accepts only 1.

    `artifact` (a path, an `Artifact` or a runner of the packed artifact the batch is for): the
    defaults of `across_rows`, `mode`, `position_offset` and `segment_max_size` come from its
    manifest, a value that contradicts it is an error, and `data` holds the model's feeds (see the
    module docstring). Without it, `across_rows=True` and `position_offset=0` by default.
    """
    if segment_num != 1:
        raise PoprtError(
            f"segment_num={segment_num} is not supported; poprt-lite packs with segment_num=1"
        )
    _check_index(datasets, index)
    arguments, interface = dict(locals()), None
    if artifact is not None:
        interface = _interface_of(artifact)
        _agree(interface, arguments)
        mode, segment_max_size, dynamic_rows = interface.mode, interface.segment_max_size, interface.dynamic_rows
    if mode is None:
        mode = modes.for_across_rows(across_rows is not False).name
    layout = modes.get(mode, "mode").layout_for(batch_size, seq_len, max_valid_num, bool(dynamic_rows))
    if algorithm is None:
        algorithm = PackAlgorithm.first_fit if layout.across_rows else PackAlgorithm.next_fit
    packer = OnlinePacker(
        algorithm,
        batch_size,
        seq_len,
        max_valid_num,
        layout.across_rows,
        segment_max_size=segment_max_size,
    )
    lengths = []
    end = index
    while end < len(datasets) and not packer.is_full:
        length = int(datasets[end].input_len)
        packer.check(length, f"datasets[{end}]")
        if not packer.try_add(length):
            break
        lengths.append(length)
        end += 1
    placement = Placement.of(lengths, packer.starts())
    if interface is not None:
        return _build_for(interface, datasets, index, layout, placement)
    return _build(datasets, index, layout, placement, position_offset or 0)


def _interface_of(artifact: str | os.PathLike | Artifact | Any) -> PackedInterface:
    """The packed interface of `artifact`: a runner's, an `Artifact`'s, or a file's (read once)."""
    interface = getattr(artifact, "interface", None)
    if interface is None and hasattr(artifact, "artifact"):  # a runner of an unpacked artifact
        artifact = artifact.artifact
    if isinstance(interface, PackedInterface):
        return interface
    if isinstance(artifact, Artifact):
        return read_packed_interface(artifact)
    if isinstance(artifact, (str, os.PathLike)):
        path = Path(artifact).resolve()
        stat = path.stat() if path.is_file() else None
        return _interface_at(path, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    raise PoprtError(f"artifact must be a path, an Artifact or a runner of one, got {type(artifact).__name__}")


@functools.lru_cache(maxsize=8)
def _interface_at(path: Path, mtime_ns: int, size: int) -> PackedInterface:
    return read_packed_interface(load_artifact(path))


def _agree(interface: PackedInterface, given: dict[str, Any]) -> None:
    """Every argument given to pack_data (`given`: its arguments by name) must agree with the
    artifact's manifest; an argument left at None takes the artifact's value."""
    layout = interface.layout
    expected = dict(batch_size=interface.batch_size, seq_len=interface.seq_len, max_valid_num=interface.max_valid_num)
    expected.update(across_rows=layout.across_rows, mode=interface.mode, position_offset=interface.position_offset)
    expected.update(segment_max_size=interface.segment_max_size, dynamic_rows=interface.dynamic_rows)
    given = {name: given[name] for name in expected}
    for name, value in given.items():
        if value is None or value == expected[name]:
            continue
        if name in ("batch_size", "seq_len", "max_valid_num"):
            raise PoprtError(
                f"{name}={value} contradicts artifact '{interface.path}', compiled for batch_size={interface.batch_size}, "
                f"seq_len={interface.seq_len}, max_valid_num={interface.max_valid_num}; pass those"
            )
        compiled = f"for {interface.mode} mode" if name in ("across_rows", "mode") else "with"
        raise PoprtError(
            f"{name}={value} contradicts artifact '{interface.path}', compiled {compiled} ({name}={expected[name]}); "
            f"leave {name} out and the artifact's is used"
        )


def _build_for(
    interface: PackedInterface, datasets: Sequence, index: int, layout: BatchLayout, placement: Placement
) -> PackedBatch:
    """The artifact's feeds for requests `datasets[index:index+len(placement)]`, checked and completed
    like a PackRunner's requests."""
    checker = RequestChecker(interface)
    lengths = placement.lengths.tolist()
    tokens = []
    for i, n in enumerate(lengths, index):
        feeds = {name: _tokens(datasets[i], name, n, i) for name in interface.token_inputs}
        tokens.append(checker.tokens(feeds, f"datasets[{i}]")[1])
    data = build_feeds(interface, layout, tokens, placement)
    info_name = interface.unpack_info[0] if interface.unpack_info else None
    unpack_info = data[info_name] if info_name else layout.unpack_info(placement)
    return PackedBatch(data, unpack_info, _specs(index, layout, placement), index + len(lengths), layout.seq_len, layout)


def _specs(index: int, layout: BatchLayout, placement: Placement) -> list[RequestSpec]:
    rows, offsets = np.divmod(placement.starts, layout.seq_len)
    lengths = placement.lengths.tolist()
    return [RequestSpec(i, r, o, m) for i, r, o, m in zip(range(index, index + len(lengths)), rows.tolist(), offsets.tolist(), lengths)]


def pad_data(
    datasets: Sequence, index: int, batch_size: int, seq_len: int, position_offset: int = 0, *, dynamic_rows: bool = False
) -> PackedBatch:
    """The padded baseline: one request per row from `datasets[index:]`, padded to `seq_len`.

    Takes `batch_size` requests (fewer at the end of `datasets`: with `dynamic_rows` the last batch
    then has fewer rows, else empty ones); `unpack_info` holds each row's length, and
    `unpack_outputs(batch, output, across_rows=False)` splits the padded model's output.
    """
    _check_index(datasets, index)
    end = min(index + batch_size, len(datasets))
    lengths = [int(datasets[i].input_len) for i in range(index, end)]
    for i, length in enumerate(lengths, index):
        check_length(length, seq_len, "seq_len", f"datasets[{i}]")
    layout = PaddedRows(batch_size, seq_len, dynamic_rows=dynamic_rows)
    return _build(datasets, index, layout, layout.placement(lengths), position_offset)


def unpack_outputs(
    batch: PackedBatch, output: np.ndarray, across_rows: bool | None = None, layout: Layout | str | None = None
) -> list[np.ndarray]:
    """Split a model output into one array per request of `batch` (views into `output`).

    Unpack/repack models return `[max_valid_num, segment_max_size, ...]` with request i in row i;
    AttentionMask models return `[batch_size, seq_len, ...]` in the packed layout; token_stream
    models return the stream `[1, T, ...]`. `layout` (the output's manifest layout) overrides that
    default, e.g. `per_request` for a pooled output `[N, ...]`.
    """
    output = np.asarray(output)
    placement = batch.placement
    mode = batch.layout.mode if batch.layout is not None else None
    if layout is None and mode is not None and modes.get(mode).token_output is Layout.stream:
        layout = Layout.stream  # one stream needs no across_rows to say how it holds the requests
    if layout is not None:
        return _split(batch, output, Layout(layout), placement)
    if across_rows:
        slots, longest = len(batch.unpack_info), max(s.length for s in batch.specs)
        if output.ndim < 2 or output.shape[0] != slots or output.shape[1] < longest:
            raise RequestError(
                f"output has shape {list(output.shape)}; an unpack/repack model returns "
                f"[max_valid_num={slots}, segment_max_size>={longest}, ...]"
            )
        return BatchLayout(*batch.data[INPUT_IDS].shape).split(output, Layout.unpacked, placement)
    shape = batch.data[INPUT_IDS].shape
    if output.shape[:2] != shape:
        raise RequestError(
            f"output has shape {list(output.shape)}; an AttentionMask-mode model returns "
            f"[batch_size={shape[0]}, seq_len={shape[1]}, ...]"
        )
    return BatchLayout(*shape).split(output, Layout.packed, placement)


def _split(batch: PackedBatch, output: np.ndarray, layout: Layout, placement: Placement) -> list[np.ndarray]:
    """Split by an explicit output layout, checking that `output` has the batch's leading dims."""
    shape = batch.data[INPUT_IDS].shape
    lead = {
        Layout.per_request: (len(batch.specs),),
        Layout.unpacked: (len(batch.specs),),
        Layout.stream: shape,
        Layout.packed: shape,
        Layout.padded: shape,
    }.get(layout)
    if lead is None:
        raise PoprtError(f"an output with layout '{layout}' holds no per-request answers; it cannot be split")
    got = output.shape[: len(lead)]
    if layout in (Layout.per_request, Layout.unpacked) and got and got[0] >= lead[0]:
        got = lead  # request slots: at least the batch's requests (max_valid_num of them when static)
    if got != lead:
        raise RequestError(f"output has shape {list(output.shape)}; a {layout} output of this batch is [{', '.join(map(str, lead))}, ...]")
    return (batch.layout or BatchLayout(*shape)).split(output, layout, placement)


def _check_index(datasets: Sequence, index: int) -> None:
    if not 0 <= index < len(datasets):
        raise PoprtError(f"index {index} is outside datasets, which holds {len(datasets)} requests")


def _tokens(request, name: str, length: int, i: int) -> np.ndarray | None:
    """The first `length` tokens of `request.<name>`, or None when the request has none."""
    values = getattr(request, name, None)
    if values is None:
        if name == INPUT_IDS:
            raise RequestError(f"datasets[{i}] has no input_ids")
        return None
    values = np.asarray(values).reshape(-1)
    if values.size < length:
        raise RequestError(
            f"datasets[{i}].{name} has {values.size} tokens but input_len is {length}"
        )
    return values[:length]


def _build(
    datasets: Sequence, index: int, layout: BatchLayout, placement: Placement, position_offset: int
) -> PackedBatch:
    """Scatter requests `datasets[index:index+len(placement)]` to their places in `layout`."""
    lengths = placement.lengths.tolist()
    requests = range(index, index + len(lengths))

    def gather(name: str, default) -> np.ndarray | None:
        parts = [_tokens(datasets[i], name, m, i) for i, m in zip(requests, lengths)]
        if all(p is None for p in parts):
            return None
        return np.concatenate([default(m) if p is None else p for p, m in zip(parts, lengths)])

    data = {
        INPUT_IDS: layout.scatter(placement, gather(INPUT_IDS, None), np.int32),
        ATTENTION_MASK: layout.mask(placement, np.int32),
    }
    token_types = gather(TOKEN_TYPE_IDS, lambda m: np.zeros(m, dtype=np.int32))
    if token_types is not None:
        data[TOKEN_TYPE_IDS] = layout.scatter(placement, token_types, np.int32)
    positions = gather(POSITION_IDS, lambda m: np.arange(m) + position_offset)
    if positions is None:
        positions = layout.positions(placement, position_offset)
    data[POSITION_IDS] = layout.scatter(placement, positions, np.int32)
    return PackedBatch(data, layout.unpack_info(placement), _specs(index, layout, placement), index + len(lengths), layout.seq_len, layout)
