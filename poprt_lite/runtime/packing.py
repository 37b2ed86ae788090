"""Packing algorithms: offline bin packing of request lengths, and the online packer of one batch.

`pack` packs a list of lengths into bins of a fixed capacity (a row, or a whole batch in
unpack/repack mode, or a token budget in token_stream mode). `OnlinePacker` places requests one at
a time into a `[batch_size, seq_len]` batch (or a token budget), as a serving runtime (PopRT's
PackRunner) does.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from poprt_lite.errors import PoprtError, RequestError


class PackAlgorithm(enum.Enum):
    """Packing algorithms: `first_fit`, `next_fit` are online; the others need the whole dataset."""

    first_fit = "first_fit"
    next_fit = "next_fit"
    best_fit_decreasing = "best_fit_decreasing"
    spfhp = "spfhp"
    longest_first = "longest_first"

    @classmethod
    def parse(cls, value: PackAlgorithm | str) -> PackAlgorithm:
        """Return the member for a member or its name; raise PoprtError for anything else."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(a.value for a in cls)
            message = f"unknown packing algorithm {value!r}; choose one of {names}"
            raise PoprtError(message) from None


ONLINE_ALGORITHMS = (PackAlgorithm.first_fit, PackAlgorithm.next_fit)


def pack(
    lengths: Sequence[int] | np.ndarray,
    algorithm: PackAlgorithm | str,
    *,
    bin_capacity: int,
    max_items_per_bin: int | None = None,
) -> list[list[int]]:
    """Pack `lengths` into bins; return each bin's indices into `lengths`.

    Every index appears exactly once; each bin's lengths sum to at most `bin_capacity` and it holds
    at most `max_items_per_bin` items (when given). `next_fit` keeps one open bin and `first_fit`
    uses the first bin with room, both in arrival order; `best_fit_decreasing` places the longest
    first, each into the fullest bin with room; `spfhp` is described in `_spfhp`; `longest_first`
    cuts the items, sorted longest first, into consecutive bins (each bin's items of similar
    length, for models whose cost follows a batch's longest request). With
    `max_items_per_bin`, both decreasing algorithms then try `_fewer_balanced_bins`, which keeps
    their result unless a count-balanced packing needs fewer bins.
    """
    algorithm = PackAlgorithm.parse(algorithm)
    _check_positive(bin_capacity=bin_capacity)
    if max_items_per_bin is not None:
        _check_positive(max_items_per_bin=max_items_per_bin)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((lengths <= 0) | (lengths > bin_capacity))
    if bad.size:
        i = int(bad[0])
        raise PoprtError(
            f"item {i} has length {lengths[i]}; lengths must be between 1 and the bin capacity "
            f"{bin_capacity}"
        )
    limit = max_items_per_bin or max(len(lengths), 1)
    if algorithm is PackAlgorithm.next_fit:
        return _next_fit(lengths.tolist(), bin_capacity, limit)
    if algorithm is PackAlgorithm.first_fit:
        return _any_fit(lengths, np.arange(len(lengths)), bin_capacity, limit, best=False)
    order = np.argsort(-lengths, kind="stable")
    if algorithm is PackAlgorithm.longest_first:
        return [[int(order[i]) for i in b] for b in _next_fit(lengths[order].tolist(), bin_capacity, limit)]
    if algorithm is PackAlgorithm.best_fit_decreasing:
        bins = _any_fit(lengths, order, bin_capacity, limit, best=True)
    else:
        bins = _spfhp(lengths, bin_capacity, limit)
    if max_items_per_bin is not None:
        bins = _fewer_balanced_bins(lengths, order, bin_capacity, limit, bins)
    return bins


def packing_efficiency(
    lengths: Sequence[int] | np.ndarray, bins: Sequence[Sequence[int]], capacity: int
) -> float:
    """Real tokens / allocated tokens: sum of the packed lengths / (number of bins * capacity)."""
    if not bins:
        return 0.0
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[list(b)].sum()) for b in bins)
    return real / (len(bins) * capacity)


def check_length(length: int, max_length: int, limit_name: str, what: str = "request") -> None:
    """Raise RequestError unless 1 <= length <= max_length (the model's `limit_name`)."""
    if not 1 <= length <= max_length:
        raise RequestError(
            f"{what} has {length} tokens, outside 1..{max_length} ({limit_name}); "
            "truncate or drop it"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise PoprtError(f"{name} must be a positive integer, got {value}")


def _next_fit(lengths: list[int], capacity: int, limit: int) -> list[list[int]]:
    """Keep one open bin; close it when the next item does not fit."""
    bins: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and (used + n > capacity or len(current) == limit):
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        bins.append(current)
    return bins


def _any_fit(
    lengths: np.ndarray, order: np.ndarray, capacity: int, limit: int, *, best: bool
) -> list[list[int]]:
    """Place items in `order` into the first bin that fits, or (best) the fullest bin that fits."""
    space = np.empty(len(lengths), dtype=np.int64)
    counts = np.empty(len(lengths), dtype=np.int64)
    bins: list[list[int]] = []
    for i in order.tolist():
        n = lengths[i]
        open_bins = len(bins)
        fits = (space[:open_bins] >= n) & (counts[:open_bins] < limit)
        if best:
            b = int(np.argmin(np.where(fits, space[:open_bins], capacity + 1))) if open_bins else 0
        else:
            b = int(np.argmax(fits)) if open_bins else 0
        if not open_bins or not fits[b]:
            b = open_bins
            bins.append([])
            space[b], counts[b] = capacity, 0
        bins[b].append(i)
        space[b] -= n
        counts[b] += 1
    return bins


def _fewer_balanced_bins(
    lengths: np.ndarray, order: np.ndarray, capacity: int, limit: int, bins: list[list[int]], tries: int = 4
) -> list[list[int]]:
    """A count limit: try to do better than `bins` by filling a fixed number of bins evenly.

    Best fit (and SPFHP) fill bins tightly with long items, so with a count limit the many short items left at
    the end may find token room only in bins that are already at the limit (with PopRT's guide
    distribution, 16 x 256-token batches of at most 40 requests: 62 batches for a lower bound of 50).
    This tries K = the lower bound (tokens and counts) and the next few bin counts below
    `len(bins)`: items in `order` (longest first) each go to the bin with the most room that takes
    them (worst fit), which keeps room and counts even. The first K that holds everything wins;
    otherwise `bins` is returned unchanged.
    """
    total = int(lengths.sum())
    lower = max(-(-total // capacity), -(-len(lengths) // limit), 1)
    for k in range(lower, min(len(bins), lower + tries)):
        space = np.full(k, capacity, dtype=np.int64)
        counts = np.zeros(k, dtype=np.int64)
        placed: list[list[int]] = [[] for _ in range(k)]
        for i in order.tolist():
            n = lengths[i]
            room = np.where((space >= n) & (counts < limit), space, -1)
            b = int(np.argmax(room))
            if room[b] < 0:
                break
            placed[b].append(i)
            space[b] -= n
            counts[b] += 1
        else:
            return [b for b in placed if b]
    return bins


def _spfhp(lengths: np.ndarray, capacity: int, limit: int) -> list[list[int]]:
    """Shortest-pack-first histogram packing (Krell et al. 2021).

    Works on the histogram of lengths, longest first. Identical packs are kept as one group with a
    count. All sequences of one length go into the open group with the most remaining space (the
    shortest packs), splitting the group if there are fewer sequences than packs; sequences that fit
    no open pack start new packs, as many to a pack as fit. A pack closes when it is full or holds
    `limit` sequences.
    """
    # remaining space -> [(count, lengths in the pack)] for the packs that can still grow
    open_groups: dict[int, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    closed: list[tuple[int, tuple[int, ...]]] = []

    def add(count: int, packed: tuple[int, ...], space: int) -> None:
        if space == 0 or len(packed) == limit:
            closed.append((count, packed))
        else:
            open_groups[space].append((count, packed))

    values, counts = np.unique(lengths, return_counts=True)
    for n, todo in zip(values[::-1].tolist(), counts[::-1].tolist()):
        while todo:
            space = max(open_groups, default=0)
            if space < n:
                per_pack = min(capacity // n, limit, todo)
                add(todo // per_pack, (n,) * per_pack, capacity - n * per_pack)
                todo %= per_pack
                continue
            group = open_groups[space]
            count, packed = group.pop()
            if not group:
                del open_groups[space]
            taken = min(count, todo)
            if count > taken:
                open_groups[space].append((count - taken, packed))
            add(taken, packed + (n,), space - n)
            todo -= taken

    pools = {n: iter(np.flatnonzero(lengths == n).tolist()) for n in values.tolist()}
    groups = closed + [g for groups in open_groups.values() for g in groups]
    return [[next(pools[n]) for n in packed] for count, packed in groups for _ in range(count)]


class OnlinePacker:
    """Places requests, one at a time and in arrival order, into one `[batch_size, seq_len]` batch.

    Unpack/repack mode (`across_rows=True`): the batch is one bin of `batch_size * seq_len` tokens
    holding at most `max_valid_num` requests laid one after another; a request may cross a row
    boundary and may have up to `segment_max_size` tokens (default `seq_len`). token_stream mode
    packs the same way into a budget of `max_tokens` tokens: `batch_size=1, seq_len=max_tokens`.
    AttentionMask mode (`across_rows=False`): every row is a bin of `seq_len` tokens and the batch
    holds at most `max_valid_num` requests; `first_fit` tries every row in order, `next_fit` only
    the current (last opened) row and then opens the next one.
    """

    def __init__(
        self,
        algorithm: PackAlgorithm | str,
        batch_size: int,
        seq_len: int,
        max_valid_num: int,
        across_rows: bool,
        *,
        segment_max_size: int | None = None,
    ) -> None:
        self.algorithm = PackAlgorithm.parse(algorithm)
        if self.algorithm not in ONLINE_ALGORITHMS:
            raise PoprtError(
                f"{self.algorithm.value} packs a whole dataset at once; online packing supports "
                "first_fit and next_fit"
            )
        _check_positive(batch_size=batch_size, seq_len=seq_len, max_valid_num=max_valid_num)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.max_valid_num = int(max_valid_num)
        self.across_rows = bool(across_rows)
        if across_rows and segment_max_size is not None:
            _check_positive(segment_max_size=segment_max_size)
            if segment_max_size > batch_size * seq_len:
                raise PoprtError(
                    f"segment_max_size {segment_max_size} is larger than the batch "
                    f"({batch_size}x{seq_len} tokens); lower it"
                )
            self.max_length, self.limit_name = int(segment_max_size), "segment_max_size"
        else:
            self.max_length, self.limit_name = self.seq_len, "seq_len"
        self.reset()

    def reset(self) -> None:
        """Empty the batch."""
        self._placements: list = []
        self._used = 0  # tokens used (across_rows)
        self._fill = [0] * self.batch_size  # tokens used per row (AttentionMask mode)
        self._row = 0  # next_fit's current row

    def check(self, length: int, what: str = "request") -> None:
        """Raise RequestError if no batch can ever hold a request of `length` tokens."""
        check_length(length, self.max_length, self.limit_name, what)

    def try_add(self, length: int) -> bool:
        """Place a request of `length` tokens; return False (changing nothing) if it doesn't fit."""
        length = int(length)
        self.check(length)
        if len(self._placements) >= self.max_valid_num:
            return False
        if self.across_rows:
            if self._used + length > self.batch_size * self.seq_len:
                return False
            self._placements.append(self._used)
            self._used += length
            return True
        if self.algorithm is PackAlgorithm.first_fit:
            row = next((r for r, f in enumerate(self._fill) if f + length <= self.seq_len), None)
            if row is None:
                return False
        else:
            row = self._row
            if self._fill[row] + length > self.seq_len:
                if row + 1 == self.batch_size:
                    return False
                row = self._row = row + 1
        self._placements.append((row, self._fill[row]))
        self._fill[row] += length
        return True

    @property
    def is_full(self) -> bool:
        """True when no further request, however short, fits."""
        if len(self._placements) >= self.max_valid_num:
            return True
        if self.across_rows:
            return self._used == self.batch_size * self.seq_len
        if self.algorithm is PackAlgorithm.first_fit:
            return min(self._fill) == self.seq_len
        return self._row + 1 == self.batch_size and self._fill[self._row] == self.seq_len

    def __len__(self) -> int:
        return len(self._placements)

    def placements(self) -> list:
        """Each added request's place: flat token offset (across_rows) or (row, offset)."""
        return list(self._placements)

    def starts(self) -> np.ndarray:
        """Each added request's flat token offset in the batch (`row * seq_len + offset`)."""
        places = np.asarray(self._placements, np.int64)
        if self.across_rows or not len(places):
            return places.reshape(-1)
        return places[:, 0] * self.seq_len + places[:, 1]

    def without_gaps(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The flat starts of what is left of a batch once some requests were withdrawn: each keeps
        its order (and in AttentionMask mode its row) and follows the one before it with no gap, as
        the packed models read a row (unpack_info counts lengths from the row's start)."""
        starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        rows = np.zeros_like(starts) if self.across_rows else starts // self.seq_len
        order = np.lexsort((starts, rows))
        compact = np.empty_like(starts)
        offset, row = 0, None
        for i in order:
            if rows[i] != row:
                row, offset = rows[i], rows[i] * self.seq_len
            compact[i] = offset
            offset += lengths[i]
        return compact



# A model call costs about as much as this many padded attention pairs (a query position against a
# key position): on all-MiniLM-L6-v2 in token_stream mode with 2 threads a call's fixed cost is ~5 ms
# (onnxruntime's per-node overhead) and a pair ~0.5 us over its layers and heads, and splits made
# with 6000-12000 ran fastest on batches of short and of mixed texts. Both costs grow with the
# layers and heads, so the ratio holds roughly across BERT-like encoders.
CALL_COST_IN_PAIRS = 8_000
# At most this many padded pairs per call (a request longer than its square root runs alone): past
# it a layer's scores (pairs x heads floats) leave the caches and every pass over them (mask,
# Softmax, the products) slows down; MiniLM's batches of 16 sorted texts of up to 256 tokens ran
# 1.5-2.3x faster in calls of 2-3 requests than in one call.
MAX_PAIRS_PER_CALL = 150_000


def length_groups(
    lengths: Sequence[int] | np.ndarray, call_cost: float = CALL_COST_IN_PAIRS, max_pairs: int = MAX_PAIRS_PER_CALL
) -> list[np.ndarray]:
    """Split a batch whose attention pads every request to the batch's longest into groups of
    similar lengths, each run as its own model call: the indices into `lengths` of each group (by
    length, shortest group first). The split minimises the groups' padded attention pairs
    (requests x longest**2 each) plus `call_cost` per group, with at most `max_pairs` pairs in a
    group of several requests; the dense layers cost the same however the tokens are grouped. One
    group when the lengths are alike and the batch is small enough."""
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    order = np.argsort(lengths, kind="stable")
    longest = lengths[order].astype(np.float64) ** 2
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: the cheapest split of the j shortest requests
    cut = np.zeros(n + 1, np.int64)  # where the last group of that split starts
    starts = np.arange(n, dtype=np.float64)
    for j in range(1, n + 1):
        # last group order[i:j], i < j: (j - i) requests padded to the j-th shortest length
        pairs = (j - starts[:j]) * longest[j - 1]
        cost = np.where((pairs <= max_pairs) | (starts[:j] == j - 1), best[:j] + pairs + call_cost, np.inf)
        cut[j] = int(np.argmin(cost))
        best[j] = cost[cut[j]]
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
