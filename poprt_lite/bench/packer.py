"""Host-side batching for the benchmark: batch plans, vectorised feeds, vectorised output split.

A `BatchPlan` says where each request of a batch lies: `indices` (requests of the workload) and
`starts` (flat token offsets in the `[batch_size * seq_len]` stream). Padded batches put request k
at row k; AttentionMask batches keep every request inside one row; unpack/repack batches lay the
requests one after another in the stream (a request may cross rows), in slot order.

Offline packing knows the whole dataset, so besides PopRT's in-order `first_fit` / `next_fit`
(what `packing_utils.pack_data` does, batch after batch) it can bin-pack globally
(`best_fit_decreasing`, `spfhp`): rows (AttentionMask) or whole batches (unpack/repack) are filled
from all requests at once, then rows are dealt into batches of `batch_size` rows holding at most
`max_valid_num` requests each.

`build_feeds` and `scatter_outputs` move a whole batch with one fancy-indexing assignment per
tensor; no Python loop runs per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poprt_lite.bench.workload import ATTENTION_MASK, Workload
from poprt_lite.errors import PoprtError
from poprt_lite.runtime.layouts import segment_ids
from poprt_lite.runtime.packing import OnlinePacker, PackAlgorithm, pack

PADDED, UNPACK_REPACK, ATTENTION_MASK_MODE = "padded", "unpack_repack", "attention_mask"
OFFLINE_ALGORITHMS = ("best_fit_decreasing", "spfhp", "first_fit", "next_fit")


@dataclass
class BatchPlan:
    indices: np.ndarray  # int64 [k] workload request indices, in slot order
    starts: np.ndarray  # int64 [k] flat token offset of each request in the batch

    def __len__(self) -> int:
        return len(self.indices)


def plan_padded(n: int, batch_size: int, seq_len: int) -> list[BatchPlan]:
    plans = []
    for lo in range(0, n, batch_size):
        k = min(batch_size, n - lo)
        plans.append(BatchPlan(np.arange(lo, lo + k, dtype=np.int64), np.arange(k, dtype=np.int64) * seq_len))
    return plans


def plan_offline(
    lengths: np.ndarray,
    mode: str,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    algorithm: str = "best_fit_decreasing",
) -> list[BatchPlan]:
    """Pack every request of `lengths` into batches for `mode` (unpack_repack or attention_mask)."""
    if algorithm not in OFFLINE_ALGORITHMS:
        raise PoprtError(f"unknown offline packing algorithm '{algorithm}'; choose one of {', '.join(OFFLINE_ALGORITHMS)}")
    lengths = np.asarray(lengths, dtype=np.int64)
    across = mode == UNPACK_REPACK
    if algorithm in ("first_fit", "next_fit"):
        return _plan_in_order(lengths, algorithm, batch_size, seq_len, max_valid_num, across)
    if across:
        bins = pack(lengths, algorithm, bin_capacity=batch_size * seq_len, max_items_per_bin=max_valid_num)
        plans = []
        for b in bins:
            idx = np.asarray(b, dtype=np.int64)
            plans.append(BatchPlan(idx, np.cumsum(lengths[idx]) - lengths[idx]))
        return _in_dataset_order(plans)
    rows = pack(lengths, algorithm, bin_capacity=seq_len, max_items_per_bin=max_valid_num)
    return _in_dataset_order(_deal_rows(rows, lengths, batch_size, seq_len, max_valid_num))


def _plan_in_order(lengths, algorithm, batch_size, seq_len, max_valid_num, across) -> list[BatchPlan]:
    """PopRT's offline packing: batch after batch, requests in order until the next one does not fit."""
    plans, i, n = [], 0, len(lengths)
    packer = OnlinePacker(algorithm, batch_size, seq_len, max_valid_num, across, segment_max_size=seq_len)
    while i < n:
        packer.reset()
        lo = i
        while i < n and not packer.is_full and packer.try_add(int(lengths[i])):
            i += 1
        placed = np.asarray(packer.placements(), dtype=np.int64)
        starts = placed if across else placed[:, 0] * seq_len + placed[:, 1]
        plans.append(BatchPlan(np.arange(lo, i, dtype=np.int64), starts.reshape(-1)))
    return plans


def _deal_rows(rows, lengths, batch_size, seq_len, max_valid_num) -> list[BatchPlan]:
    """Deal packed rows into as few batches as hold them, at most `max_valid_num` requests each."""
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
        if load.max() <= max_valid_num:
            break
        n_batches += 1
    plans = []
    for batch_rows in members:
        if not batch_rows:
            continue
        idx, starts = [], []
        for row_slot, r in enumerate(sorted(batch_rows, key=lambda r: min(rows[r]))):
            items = np.asarray(rows[r], dtype=np.int64)
            idx.append(items)
            starts.append(row_slot * seq_len + np.cumsum(lengths[items]) - lengths[items])
        plans.append(BatchPlan(np.concatenate(idx), np.concatenate(starts)))
    return plans


def _in_dataset_order(plans: list[BatchPlan]) -> list[BatchPlan]:
    return sorted(plans, key=lambda p: int(p.indices.min()))


class BatchBuilder:
    """Builds model feeds for batch plans and scatters outputs back, for one model interface."""

    def __init__(
        self,
        workload: Workload,
        mode: str,
        batch_size: int,
        seq_len: int,
        inputs: dict[str, np.dtype],
        max_valid_num: int | None = None,
        segment_max_size: int | None = None,
    ) -> None:
        self.workload, self.mode = workload, mode
        self.batch_size, self.seq_len = batch_size, seq_len
        self.inputs = inputs  # model input name -> dtype
        self.max_valid_num, self.segment_max_size = max_valid_num, segment_max_size

    def _index(self, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lengths = self.workload.lengths[plan.indices]
        first = np.cumsum(lengths) - lengths
        dest = np.repeat(plan.starts - first, lengths) + np.arange(int(lengths.sum()))
        return lengths, dest, self.workload.gather_index(plan.indices)

    def build_feeds(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        lengths, dest, src = self._index(plan)
        slots = self.batch_size * self.seq_len
        feeds = {}
        for name, dtype in self.inputs.items():
            if name == "unpack_info":
                info = np.zeros(self.max_valid_num, dtype)
                info[: len(lengths)] = lengths
                feeds[name] = info
                continue
            flat = np.zeros(slots, dtype)
            if name == ATTENTION_MASK:
                if self.mode == ATTENTION_MASK_MODE:
                    flat[dest] = np.repeat(segment_ids(plan.starts // self.seq_len, plan.starts), lengths)
                else:
                    flat[dest] = 1
            else:
                flat[dest] = self.workload.tokens[name][src]
            feeds[name] = flat.reshape(self.batch_size, self.seq_len)
        return feeds

    def scatter_outputs(self, plan: BatchPlan, outputs: dict[str, np.ndarray], results: dict[str, np.ndarray]) -> None:
        """Copy each request's real-token outputs to `results[name][its tokens]` (dataset order)."""
        lengths, dest, src = self._index(plan)
        if self.mode == UNPACK_REPACK:  # [max_valid_num, segment_max_size, ...]: request i in row i
            first = np.cumsum(lengths) - lengths
            row_start = np.arange(len(lengths), dtype=np.int64) * self.segment_max_size
            dest = np.repeat(row_start - first, lengths) + np.arange(int(lengths.sum()))
        for name, out in outputs.items():
            flat = out.reshape(-1, *out.shape[2:])
            results[name][src] = flat[dest]
