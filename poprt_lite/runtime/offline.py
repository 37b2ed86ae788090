"""Offline packing: a whole set of requests planned into batches at once, run, and answered per request.

`plan_batches` knows every request's length up front, so besides PopRT's in-order `first_fit` /
`next_fit` (what `packing_utils.pack_data` does, batch after batch) it bin-packs globally
(`best_fit_decreasing`, `spfhp` or `longest_first`): the whole batch is one bin of token slots in
layouts where a request may cross rows (unpack/repack, token_stream), else each row is a bin and the
packed rows are dealt into batches of `batch_size` rows holding at most `max_valid_num` requests.
The default (`default_algorithm`) is `best_fit_decreasing`, the fewest batches, except where the
model's attention rows are as long as the batch's longest request (token_stream): there
`longest_first` (consecutive runs of the requests sorted by length) keeps each batch's requests of
similar length: on the bench's workloads 12-15% less CPU than best_fit_decreasing's batches, whose
long requests are topped up with short ones (`benchmarks/offline_planning.py`); each batch then runs
as the model calls `packing.length_groups` makes of it, as a PackRunner runs its batches.

`run_requests` / `iter_requests` drive a packed artifact's `ModelRunner` with it: every request is
checked and completed from the manifest (`runtime/requests.py`: token types, position ids with the
artifact's offset, the attention mask and unpack_info of its mode), each batch is built and split
by the artifact's `BatchLayout`, and the answers come back in the requests' order.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poprt_lite.errors import PoprtError
from poprt_lite.runtime.layouts import BatchLayout, Placement
from poprt_lite.runtime import modes
from poprt_lite.runtime.packing import ONLINE_ALGORITHMS, OnlinePacker, PackAlgorithm, length_groups, pack
from poprt_lite.runtime.requests import RequestChecker, build_feeds, split_outputs

if TYPE_CHECKING:
    from poprt_lite.runtime.model_runner import ModelRunner

CHUNK_BATCHES = 16  # iter_requests plans this many batches' worth of requests at a time

Batch = tuple[np.ndarray, Placement]  # indices of the requests (slot order) and where they lie


def default_algorithm(layout: BatchLayout) -> PackAlgorithm:
    """The offline packing a layout runs best with (see the module docstring)."""
    return PackAlgorithm.longest_first if layout.rows_follow_longest else PackAlgorithm.best_fit_decreasing


def plan_batches(
    layout: BatchLayout,
    lengths: Sequence[int] | np.ndarray,
    algorithm: PackAlgorithm | str | None = None,
    max_length: int | None = None,
) -> list[Batch]:
    """Pack requests of `lengths` into batches of `layout`: each batch's request indices (into
    `lengths`, in slot order) and their `Placement`. Batches come in the order of their first request.
    `max_length` bounds a request where it may cross rows (segment_max_size; default seq_len);
    `algorithm=None` is the layout's `default_algorithm`."""
    algorithm = default_algorithm(layout) if algorithm is None else PackAlgorithm.parse(algorithm)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if not len(lengths):
        return []
    if algorithm in ONLINE_ALGORITHMS:
        return _calls(layout, lengths, _in_order(layout, lengths, algorithm, max_length))
    if layout.across_rows:
        capacity = layout.batch_size * layout.seq_len
        if max_length is not None and lengths.max() > max_length:
            i = int(np.argmax(lengths > max_length))
            raise PoprtError(f"request {i} has {int(lengths[i])} tokens, more than segment_max_size {max_length}")
        bins = pack(lengths, algorithm, bin_capacity=capacity, max_items_per_bin=layout.max_valid_num)
        batches = []
        for members in bins:
            idx = np.asarray(members, dtype=np.int64)
            batches.append((idx, Placement.of(lengths[idx], np.cumsum(lengths[idx]) - lengths[idx])))
    else:
        rows = pack(lengths, algorithm, bin_capacity=layout.seq_len, max_items_per_bin=layout.max_valid_num)
        batches = _deal_rows(rows, lengths, layout)
    return sorted(_calls(layout, lengths, batches), key=lambda batch: int(batch[0].min()))


def _calls(layout: BatchLayout, lengths: np.ndarray, batches: list[Batch]) -> list[Batch]:
    """The batches as the model calls that run them (`calls_of`)."""
    calls = []
    for idx, placement in batches:
        groups = calls_of(layout, lengths[idx])
        calls.extend([(idx, placement)] if groups is None else [(idx[g], p) for g, p in groups])
    return calls


def calls_of(layout: BatchLayout, lengths: Sequence[int] | np.ndarray) -> list[Batch] | None:
    """One batch's requests (their lengths in slot order) as the model calls that run it: in a mode
    whose attention pads every request to the batch's longest, its groups of similar lengths
    (`packing.length_groups`: indices into `lengths` and each call's placement); None where the
    batch runs as packed, in one call."""
    if layout.mode is None or not modes.get(layout.mode).length_groups or len(lengths) < 2:
        return None
    lengths = np.asarray(lengths, np.int64)
    return [(group, layout.placement(lengths[group])) for group in length_groups(lengths)]


def _in_order(layout: BatchLayout, lengths: np.ndarray, algorithm: PackAlgorithm, max_length: int | None) -> list[Batch]:
    """PopRT's offline packing: batch after batch, requests in order until the next one does not fit."""
    packer = OnlinePacker(
        algorithm,
        layout.batch_size,
        layout.seq_len,
        layout.max_valid_num,
        layout.across_rows,
        segment_max_size=max_length if layout.across_rows else None,
    )
    batches, i, n = [], 0, len(lengths)
    while i < n:
        packer.reset()
        first = i
        while i < n and not packer.is_full and packer.try_add(int(lengths[i])):
            i += 1
        idx = np.arange(first, i, dtype=np.int64)
        batches.append((idx, Placement.of(lengths[idx], packer.starts())))
    return batches


def _deal_rows(rows: list[list[int]], lengths: np.ndarray, layout: BatchLayout) -> list[Batch]:
    """Deal packed rows into as few batches as hold them, at most `max_valid_num` requests each."""
    batch_size, seq_len = layout.batch_size, layout.seq_len
    counts = np.array([len(r) for r in rows])
    order = np.argsort(-counts, kind="stable")  # most crowded rows first, each to the emptiest batch
    n_batches = -(-len(rows) // batch_size)
    while True:
        members: list[list[int]] = [[] for _ in range(n_batches)]
        load = np.zeros(n_batches, dtype=np.int64)
        for r in order.tolist():
            open_ = np.array([len(m) < batch_size for m in members])
            b = int(np.argmin(np.where(open_, load, np.iinfo(np.int64).max)))
            members[b].append(r)
            load[b] += counts[r]
        if load.max() <= layout.max_valid_num:
            break
        n_batches += 1
    batches = []
    for batch_rows in members:
        if not batch_rows:
            continue
        idx, starts = [], []
        for row_slot, r in enumerate(sorted(batch_rows, key=lambda r: min(rows[r]))):
            items = np.asarray(rows[r], dtype=np.int64)
            idx.append(items)
            starts.append(row_slot * seq_len + np.cumsum(lengths[items]) - lengths[items])
        idx_all = np.concatenate(idx)
        batches.append((idx_all, Placement.of(lengths[idx_all], np.concatenate(starts))))
    return batches


# ------------------------------------------------------------------------------ running requests


def run_requests(
    runner: ModelRunner,
    requests: Sequence[Mapping[str, Any]],
    *,
    algorithm: PackAlgorithm | str | None = None,
    progress: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Every request's outputs, in the order of `requests` (see `ModelRunner.run_requests`)."""
    return list(iter_requests(runner, requests, algorithm=algorithm, progress=progress, total=len(requests)))


def iter_requests(
    runner: ModelRunner,
    requests: Iterable[Mapping[str, Any]] | str | os.PathLike,
    *,
    algorithm: PackAlgorithm | str | None = None,
    progress: bool = False,
    total: int | None = None,
    chunk: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield every request's outputs, in order, packing `chunk` requests at a time (default: 16
    batches' worth). `requests` may be a path to a JSON Lines file (`read_jsonl`)."""
    interface = runner.packed_interface("run_requests")
    layout, checker = interface.layout, RequestChecker(interface)
    if isinstance(requests, (str, os.PathLike)):
        requests = read_jsonl(requests)
    if total is None and hasattr(requests, "__len__"):
        total = len(requests)  # type: ignore[arg-type]
    chunk = chunk or CHUNK_BATCHES * interface.max_valid_num
    names = list(interface.outputs)
    iterator = iter(enumerate(requests))
    with progress_bar(progress, total) as advance:
        while True:
            taken = list(itertools.islice(iterator, chunk))
            if not taken:
                return
            read = [checker.tokens(feeds, f"request {i}") for i, feeds in taken]
            answers: list[dict[str, np.ndarray] | None] = [None] * len(read)
            for idx, placement in plan_batches(layout, [n for n, _ in read], algorithm, interface.max_length):
                batch = [read[i][1] for i in idx.tolist()]
                feeds = build_feeds(interface, layout, batch, placement)
                results = dict(zip(names, runner.session.run(names, runner.check_feeds(feeds))))
                for i, share in zip(idx.tolist(), split_outputs(interface, layout, results, placement)):
                    answers[i] = {name: value.copy() for name, value in share.items()}
                advance(len(batch))
            yield from answers  # type: ignore[misc]


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Requests from a JSON Lines file: one object per line, input name -> list of token values,
    e.g. `{"input_ids": [101, 2054, 102], "token_type_ids": [0, 0, 0]}`."""
    path = Path(path)
    if not path.is_file():
        raise PoprtError(f"requests file '{path}' does not exist")
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError:
                raise PoprtError(f"{path}:{number} is not a JSON object (one request per line)") from None
            if not isinstance(request, dict):
                raise PoprtError(f"{path}:{number} is not a JSON object (one request per line)")
            yield {name: np.asarray(values) for name, values in request.items()}


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int | None, counted: str = "requests") -> Iterator[Callable[[int], None]]:
    """A rich progress bar over `total` `counted` (on stderr) while the block runs; its `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    # rich only where a bar is asked for: the runtime's serving paths never load it
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn(counted), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(counted, total=total)
        yield lambda n: bar.advance(task, n)
