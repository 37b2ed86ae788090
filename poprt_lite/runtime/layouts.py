"""The packing core: where the requests of one batch lie, how their tokens become the model's feeds,
and how each output is split back into one answer per request.

A batch is a `Placement`: each request's length and the flat offset of its first token in the
batch's token slots (`row * seq_len + column` for row layouts). Each way of laying requests out
lives in one `BatchLayout` class, the host layout of the artifact's pack mode (`runtime/modes.py`,
`modes.layout_for`):

- `PaddedRows` (not packed): request k fills row k from column 0; `attention_mask` 1 on tokens.
- `StreamAcrossRows` (unpack_repack): requests one after another in the flattened `B*S` stream (a
  request may cross rows); `attention_mask` 1 on tokens; `unpack_info` = the lengths, in order.
- `SegmentRows` (attention_mask): each request inside one row; `attention_mask` holds segment ids
  1, 2, ... for the requests of a row, in column order.
- `TokenStream` (token_stream): the requests' real tokens one after another, fed as `[1, T]` with T
  the batch's token count (the shape follows the batch: no padding); `attention_mask` 1 on tokens;
  `unpack_info` = the lengths of the batch's requests only (no unused slots).

Every runner (PackRunner, `packing_utils`, `--check`, the bench) builds feeds and splits outputs
here, so a layout is spelled once. A batch's feeds have the layout's `shape(placement)`:
`[batch_size, seq_len]`; with `dynamic_rows` (an artifact compiled with `--dynamic_rows`) only the
rows the batch uses, `[rows, seq_len]`; `[1, T]` for the token stream. Outputs are split by their manifest
`Layout`: per token (`packed`, `padded`, `stream`: at the request's flat offset; `unpacked`: row
i), or per request (`per_request`: one row per request slot, see `Placement.slots`).
`read_placement` is the inverse of building feeds: it reads where the requests of packed feeds lie
back from their attention mask (and `unpack_info`), refusing feeds that the layout would not have
built, so that the plain runner can check feeds packed by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.vocab import Layout


@dataclass(frozen=True, eq=False)
class Placement:
    """The requests of one batch, in slot order: request i has `lengths[i]` tokens starting at flat
    token offset `starts[i]`."""

    lengths: np.ndarray  # int64 [k]
    starts: np.ndarray  # int64 [k]

    @classmethod
    def of(cls, lengths: Sequence[int] | np.ndarray, starts: Sequence[int] | np.ndarray) -> Placement:
        return cls(np.asarray(lengths, np.int64).reshape(-1), np.asarray(starts, np.int64).reshape(-1))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @cached_property
    def within(self) -> np.ndarray:
        """Each token's position inside its own request (requests concatenated in slot order)."""
        first = np.cumsum(self.lengths) - self.lengths
        return np.arange(self.tokens) - np.repeat(first, self.lengths)

    @cached_property
    def slots(self) -> np.ndarray:
        """Each request's row in the outputs with one row per request slot (`unpacked`,
        `per_request`). The packed models number the slots in the order of the requests' first
        tokens in the flattened batch (`passes/pack_tail.py`): unpack_info's order, or row-major in
        AttentionMask mode, whatever order the requests were placed in (first_fit may put a later
        request in an earlier row)."""
        order = np.argsort(self.starts, kind="stable")
        slots = np.empty(len(order), np.int64)
        slots[order] = np.arange(len(order))
        return slots

    @cached_property
    def destinations(self) -> np.ndarray:
        """Each token's flat slot in the batch (requests concatenated in slot order)."""
        return np.repeat(self.starts, self.lengths) + self.within


class BatchLayout:
    """How the requests of a batch sit in a `[batch_size, seq_len]` model input (a batch holds at
    most `batch_size * seq_len` tokens)."""

    across_rows: ClassVar[bool] = False  # may a request cross a row boundary?
    # Does the model run attention on rows as long as the batch's longest request (its cost then
    # follows that length, so batches of similar lengths waste least)?
    rows_follow_longest: ClassVar[bool] = False
    # For messages about packed feeds: what marks the requests, and the likely mistake when a
    # request's position ids jump inside it.
    delimited_by: ClassVar[str] = "the rows"
    misplaced: ClassVar[str] = "one request per row, from column 0"

    def __init__(
        self, batch_size: int, seq_len: int, max_valid_num: int | None = None, dynamic_rows: bool = False, mode: str | None = None
    ) -> None:
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.max_valid_num = int(max_valid_num if max_valid_num is not None else batch_size)
        self.dynamic_rows = bool(dynamic_rows)
        self.mode = mode  # the pack mode this layout serves, for messages (None: not packed)

    def shape(self, placement: Placement) -> tuple[int, int]:
        """The `[batch, seq]` shape of the per-token feeds of the batch holding `placement`: every
        row, or with `dynamic_rows` the rows up to the last one a request uses (at least one)."""
        if not self.dynamic_rows:
            return (self.batch_size, self.seq_len)
        end = int((placement.starts + placement.lengths).max(initial=1))
        return (-(-end // self.seq_len), self.seq_len)

    def mask_values(self, placement: Placement) -> np.ndarray:
        """The attention-mask value of every token (requests concatenated): 1 on real tokens."""
        return np.ones(placement.tokens, np.int64)

    def scatter(self, placement: Placement, values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
        """Put per-token `values` (`[tokens, ...]`, requests concatenated) at their slots; 0 elsewhere."""
        values = np.asarray(values)
        shape = self.shape(placement)
        flat = np.zeros((int(np.prod(shape)), *values.shape[1:]), dtype)
        flat[placement.destinations] = values
        return flat.reshape(*shape, *values.shape[1:])

    def mask(self, placement: Placement, dtype: np.dtype | type) -> np.ndarray:
        return self.scatter(placement, self.mask_values(placement), dtype)

    def mask_like(self, placement: Placement, given: np.ndarray) -> np.ndarray:
        """The mask this layout builds for `placement`, for comparing with a `given` one: with
        dynamic rows a caller may send more (empty) rows than the batch uses, so it gets as many."""
        want = self.mask(placement, given.dtype)
        extra = given.shape[0] - want.shape[0] if given.ndim == 2 and given.shape[1:] == want.shape[1:] else 0
        if self.dynamic_rows and extra > 0:
            want = np.concatenate([want, np.zeros((extra, want.shape[1]), want.dtype)])
        return want

    def positions(self, placement: Placement, offset: int) -> np.ndarray:
        """Position ids restarting at `offset` for each request (requests concatenated)."""
        return placement.within + offset

    def unpack_info(self, placement: Placement, dtype: np.dtype | type = np.int32) -> np.ndarray:
        """`[max_valid_num]`: the request lengths in slot order, 0 for unused slots."""
        info = np.zeros(self.max_valid_num, dtype)
        info[: len(placement)] = placement.lengths
        return info

    def read_placement(self, mask: np.ndarray | None, unpack_info: np.ndarray | None, names: tuple[str, str]) -> Placement:
        """Where the requests of packed feeds lie, read back from their attention mask `mask`
        (`shape(placement)`) and `unpack_info`: the inverse of `mask` and `unpack_info`. Feeds that this
        layout would not have built raise RequestError naming the disagreement; `names` are the
        mask's and unpack_info's input names, for the messages."""
        raise PoprtError(f"{type(self).__name__} cannot read requests back from packed feeds")

    def locate(self, flat: int) -> str:
        """A flat token slot, for messages: `row r, column c`."""
        row, column = divmod(int(flat), self.seq_len)
        return f"row {row}, column {column}"

    def split(self, output: np.ndarray, layout: Layout | str, placement: Placement) -> list[np.ndarray]:
        """One view of `output` per request of `placement`, by the output's layout."""
        layout = Layout(layout)
        if layout in (Layout.packed, Layout.padded, Layout.stream):
            flat = output.reshape(-1, *output.shape[2:])
            return [flat[s : s + n] for s, n in zip(placement.starts.tolist(), placement.lengths.tolist())]
        if layout is Layout.unpacked:
            return [output[i, :n] for i, n in zip(placement.slots.tolist(), placement.lengths.tolist())]
        if layout is Layout.per_request:
            return [output[i] for i in placement.slots.tolist()]
        raise PoprtError(f"an output with layout '{layout}' holds no per-request answers; it cannot be split")

    def gather(self, output: np.ndarray, layout: Layout | str, placement: Placement) -> np.ndarray:
        """The per-token values of every request, concatenated in slot order (`[tokens, ...]`), with
        one fancy index instead of a loop per request."""
        layout = Layout(layout)
        if layout is Layout.unpacked:
            rows = np.repeat(placement.slots, placement.lengths)
            return output[rows, placement.within]
        if layout in (Layout.packed, Layout.padded, Layout.stream):
            return output.reshape(-1, *output.shape[2:])[placement.destinations]
        raise PoprtError(f"an output with layout '{layout}' has no per-token values to gather")


class PaddedRows(BatchLayout):
    """Not packed: one request per row, from column 0 (the padded baseline)."""

    def placement(self, lengths: Sequence[int]) -> Placement:
        return Placement.of(lengths, np.arange(len(lengths)) * self.seq_len)


class StreamAcrossRows(BatchLayout):
    """unpack_repack: one stream of `batch_size * seq_len` tokens, a request may cross rows."""

    across_rows = True
    delimited_by = "the lengths in unpack_info"
    misplaced = "unpack_info must hold the requests' lengths in the order they lie in the batch, as pack_data(..., across_rows=True) builds it"

    def read_placement(self, mask: np.ndarray | None, unpack_info: np.ndarray | None, names: tuple[str, str]) -> Placement:
        mask_name, info_name = names
        if unpack_info is None:
            raise RequestError(f"missing feed '{info_name}': the lengths of the requests, in the order they lie in the batch")
        info = np.asarray(unpack_info, np.int64).reshape(-1)
        used = int(np.argmin(info != 0)) if (info == 0).any() else len(info)
        if (info[used:] != 0).any():
            late = used + int(np.argmax(info[used:] != 0))
            raise RequestError(
                f"feed '{info_name}' has {int(info[late])} in slot {late} after an unused slot ({info_name}[{used}] = 0); "
                "the lengths of the requests come first, 0 only for the unused slots after them"
            )
        lengths = info[:used]
        placement = Placement.of(lengths, np.cumsum(lengths) - lengths)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.max(initial=0) > 1:
                raise RequestError(
                    f"feed '{mask_name}' holds segment ids up to {int(mask.max())}, but this artifact was compiled for "
                    f"{self.mode} mode, whose {mask_name} is 1 on tokens and 0 on padding: pack for this mode "
                    "(across_rows=True, or pack_data(..., artifact=...))"
                )
            want = self.mask_like(placement, mask)
            if mask.shape != want.shape:
                raise RequestError(
                    f"feed '{mask_name}' has shape {list(mask.shape)}, but '{info_name}' places {placement.tokens} tokens "
                    f"in a batch of shape {list(want.shape)}"
                )
            if not np.array_equal(mask != 0, want != 0):
                first = int(np.argmax((mask != 0).reshape(-1) != (want != 0).reshape(-1)))
                raise RequestError(
                    f"feed '{mask_name}' disagrees with '{info_name}' at {self.locate(first)}: {info_name} places "
                    f"{placement.tokens} tokens one after another from the start of the batch, {mask_name} has "
                    f"{int(np.count_nonzero(mask))} non-zero values"
                )
        return placement


class SegmentRows(BatchLayout):
    """attention_mask: each request inside one row; segment ids 1, 2, ... per row, in column order."""

    delimited_by = "the segment ids of attention_mask"
    misplaced = (
        "several requests share one segment id; this artifact (attention_mask mode) takes each request inside one row "
        "with its own segment id: pack with across_rows=False, or with pack_data(..., artifact=...)"
    )

    def mask_values(self, placement: Placement) -> np.ndarray:
        return np.repeat(segment_ids(placement.starts // self.seq_len, placement.starts), placement.lengths)

    def read_placement(self, mask: np.ndarray | None, unpack_info: np.ndarray | None, names: tuple[str, str]) -> Placement:
        mask_name = names[0]
        if mask is None:
            raise RequestError(f"missing feed '{mask_name}': the segment id of every token")
        rows = np.asarray(mask).reshape(-1, self.seq_len).astype(np.int64)
        edge = np.ones((rows.shape[0], 1), bool)
        changes = rows[:, 1:] != rows[:, :-1]
        first = np.flatnonzero((rows != 0) & np.concatenate([edge, changes], axis=1))
        last = np.flatnonzero((rows != 0) & np.concatenate([changes, edge], axis=1))
        placement = Placement.of(last - first + 1, first)
        want = self.mask_like(placement, rows)
        if not np.array_equal(rows, want):
            at = int(np.argmax(rows.reshape(-1) != want.reshape(-1)))
            row = at // self.seq_len
            raise RequestError(
                f"feed '{mask_name}' holds segment ids {_runs(rows[row])} in row {row}; {self.mode} mode numbers the "
                f"requests of a row 1, 2, 3, ... in column order, each request one run of its id, 0 on padding"
            )
        return placement


class TokenStream(StreamAcrossRows):
    """token_stream: one `[1, T]` stream of the batch's T real tokens, requests one after another;
    `batch_size * seq_len` (1 x max_tokens) only bounds T. `unpack_info` holds the batch's lengths,
    without unused slots (the model's rows follow it)."""

    rows_follow_longest = True
    misplaced = "unpack_info must hold the requests' lengths in the order they lie in the stream"

    def placement(self, lengths: Sequence[int]) -> Placement:
        lengths = np.asarray(lengths, np.int64)
        return Placement.of(lengths, np.cumsum(lengths) - lengths)

    def shape(self, placement: Placement) -> tuple[int, int]:
        return (1, placement.tokens)

    def unpack_info(self, placement: Placement, dtype: np.dtype | type = np.int32) -> np.ndarray:
        return placement.lengths.astype(dtype)


def segment_ids(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """AttentionMask mode's segment ids: 1, 2, 3, ... for the requests of each row, in the order of
    their flat token offsets `starts` (row * seq_len + offset)."""
    order = np.argsort(starts, kind="stable")
    sorted_rows = np.asarray(rows)[order]
    k = len(sorted_rows)
    new_row = np.ones(k, bool)
    new_row[1:] = sorted_rows[1:] != sorted_rows[:-1]
    first = np.maximum.accumulate(np.where(new_row, np.arange(k), 0))
    ids = np.empty(k, np.int64)
    ids[order] = np.arange(k) - first + 1
    return ids


def _runs(row: np.ndarray) -> str:
    """A row of segment ids as its runs, for messages: `1x5, 2x3, 0x8`."""
    bounds = np.flatnonzero(np.diff(row)) + 1
    parts = [f"{int(part[0])}x{len(part)}" for part in np.split(row, bounds)]
    return ", ".join(parts[:8]) + (", ..." if len(parts) > 8 else "")
