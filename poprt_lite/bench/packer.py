"""Host-side batching for the benchmark: batch plans of every offline mode, feeds, output gathering.

A `Batch` is a plan: which workload requests it holds (`indices`, in slot order), the packing core's
`BatchLayout` that lays them out and their `Placement` in it (`runtime/layouts.py`, the arithmetic
every runner shares). Plans:

- `plan_padded`: `batch_size` requests per batch in dataset order, one per row of the static
  `[batch_size, seq_len]` input (the padded baseline);
- `plan_packed`: the whole dataset packed ahead for a pack mode. Besides PopRT's in-order
  `first_fit` / `next_fit` (what `packing_utils.pack_data` does, batch after batch) it can bin-pack
  globally (`best_fit_decreasing`, `spfhp`): whole batches when the layout lets a request cross rows
  (unpack/repack), else rows, dealt into batches of `batch_size` rows holding at most
  `max_valid_num` requests each;
- `plan_dynamic`: the original dynamic-shape model's batches: one request each at its own length,
  or requests sorted by length, `batch_size` per batch, padded to the batch's longest.

`Feeder` builds a batch's feeds by input role and gathers each output's real tokens back into
dataset order, with one fancy-indexing assignment per tensor; no Python loop runs per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from poprt_lite.bench.workload import Workload
from poprt_lite.errors import PoprtError
from poprt_lite.runtime.layouts import BatchLayout, PaddedRows, Placement, layout_for
from poprt_lite.runtime.packing import OnlinePacker, PackAlgorithm, pack
from poprt_lite.vocab import Layout, PackMode, Role

OFFLINE_ALGORITHMS = tuple(a.value for a in PackAlgorithm)


@dataclass
class Batch:
    indices: np.ndarray  # int64 [k] workload request indices, in slot order
    layout: BatchLayout
    placement: Placement

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def slots(self) -> int:
        """Token slots the model runs for this batch."""
        return int(np.prod(self.layout.shape(self.placement)))


def _batch(layout: BatchLayout, indices, lengths: np.ndarray, starts) -> Batch:
    indices = np.asarray(indices, dtype=np.int64)
    return Batch(indices, layout, Placement.of(lengths[indices], starts))


def plan_padded(lengths: np.ndarray, batch_size: int, seq_len: int) -> list[Batch]:
    layout = PaddedRows(batch_size, seq_len)
    lengths = np.asarray(lengths, dtype=np.int64)
    return [
        _batch(layout, idx, lengths, np.arange(len(idx)) * seq_len)
        for idx in np.array_split(np.arange(len(lengths)), range(batch_size, len(lengths), batch_size))
    ]


def plan_dynamic(lengths: np.ndarray, batch_size: int, sort: bool) -> list[Batch]:
    """Batches of the dynamic-shape model: `batch_size` requests (in dataset order, or sorted by
    length), each batch `[k, longest]`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    plans = []
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        width = int(lengths[idx].max())
        plans.append(_batch(PaddedRows(len(idx), width), idx, lengths, np.arange(len(idx)) * width))
    return plans


def plan_packed(
    lengths: np.ndarray,
    mode: PackMode,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    algorithm: PackAlgorithm | str = PackAlgorithm.best_fit_decreasing,
) -> list[Batch]:
    """Pack every request of `lengths` into batches of the layout of pack mode `mode`."""
    algorithm = PackAlgorithm.parse(algorithm)
    lengths = np.asarray(lengths, dtype=np.int64)
    layout = layout_for(mode, batch_size, seq_len, max_valid_num)
    if algorithm in (PackAlgorithm.first_fit, PackAlgorithm.next_fit):
        return _plan_in_order(lengths, layout, algorithm)
    if layout.across_rows:  # one bin per batch: the whole token stream
        bins = pack(lengths, algorithm, bin_capacity=layout.batch_size * layout.seq_len, max_items_per_bin=max_valid_num)
        plans = [_batch(layout, b, lengths, np.cumsum(lengths[b]) - lengths[b]) for b in bins]
    else:
        rows = pack(lengths, algorithm, bin_capacity=seq_len, max_items_per_bin=max_valid_num)
        plans = _deal_rows(rows, lengths, layout)
    return sorted(plans, key=lambda p: int(p.indices.min()))  # dataset order


def _plan_in_order(lengths: np.ndarray, layout: BatchLayout, algorithm: PackAlgorithm) -> list[Batch]:
    """PopRT's offline packing: batch after batch, requests in order until the next one does not fit."""
    plans, i, n = [], 0, len(lengths)
    packer = OnlinePacker(
        algorithm, layout.batch_size, layout.seq_len, layout.max_valid_num, layout.across_rows, segment_max_size=layout.seq_len
    )
    while i < n:
        packer.reset()
        lo = i
        while i < n and not packer.is_full and packer.try_add(int(lengths[i])):
            i += 1
        plans.append(_batch(layout, np.arange(lo, i), lengths, packer.starts()))
    return plans


def _deal_rows(rows: list[list[int]], lengths: np.ndarray, layout: BatchLayout) -> list[Batch]:
    """Deal packed rows into as few batches as hold them, at most `max_valid_num` requests each."""
    batch_size, seq_len, limit = layout.batch_size, layout.seq_len, layout.max_valid_num
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
        if load.max() <= limit:
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
        plans.append(_batch(layout, np.concatenate(idx), lengths, np.concatenate(starts)))
    return plans


class Feeder:
    """Builds a model's feeds for batch plans and gathers its outputs back into dataset order.

    `inputs`: model input name -> (role, dtype); `outputs`: output name -> layout.
    """

    def __init__(
        self,
        workload: Workload,
        inputs: Mapping[str, tuple[Role, np.dtype]],
        outputs: Mapping[str, Layout],
    ) -> None:
        self.workload, self.inputs, self.outputs = workload, dict(inputs), dict(outputs)
        for name, (role, _) in self.inputs.items():
            if role not in (Role.attention_mask, Role.unpack_info) and role not in workload.tokens:
                raise PoprtError(
                    f"input '{name}' has role '{role}'; the benchmark feeds token ids, token types, "
                    "position ids, the attention mask and unpack_info only"
                )

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        layout, placement = batch.layout, batch.placement
        src = None
        feeds = {}
        for name, (role, dtype) in self.inputs.items():
            if role is Role.attention_mask:
                feeds[name] = layout.mask(placement, dtype)
            elif role is Role.unpack_info:
                feeds[name] = layout.unpack_info(placement, dtype)
            else:
                src = self.workload.gather_index(batch.indices) if src is None else src
                feeds[name] = layout.scatter(placement, self.workload.tokens[role][src], dtype)
        return feeds

    def gather(self, batch: Batch, outputs: Mapping[str, np.ndarray], results: Mapping[str, np.ndarray]) -> None:
        """Copy each request's real-token outputs to `results[name][its tokens]` (dataset order)."""
        src = self.workload.gather_index(batch.indices)
        for name, out in outputs.items():
            results[name][src] = batch.layout.gather(out, self.outputs[name], batch.placement)
