"""Host-side batching for the benchmark: batch plans of every offline mode, feeds, output gathering.

A `Batch` is a plan: which workload requests it holds (`indices`, in slot order), the packing core's
`BatchLayout` that lays them out and their `Placement` in it (`runtime/layouts.py`, the arithmetic
every runner shares). Plans:

- `plan_padded`: `batch_size` requests per batch in dataset order, one per row of the static
  `[batch_size, seq_len]` input (the padded baseline);
- `plan_packed`: the whole dataset packed ahead for a pack mode, by the runtime's offline planner
  (`runtime/offline.py`, the one `ModelRunner.run_requests` uses): PopRT's in-order `first_fit` /
  `next_fit`, or global bin packing (`best_fit_decreasing`, `spfhp`, `longest_first`; by default
  the layout's own, `runtime.offline.default_algorithm`);
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
from poprt_lite.runtime.layouts import BatchLayout, PaddedRows, Placement
from poprt_lite.runtime.modes import layout_for
from poprt_lite.runtime.offline import plan_batches
from poprt_lite.runtime.packing import PackAlgorithm
from poprt_lite.vocab import Layout, Role

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
    mode: str,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    algorithm: PackAlgorithm | str | None = None,
) -> list[Batch]:
    """Pack every request of `lengths` into batches of the layout of pack mode `mode`
    (`runtime.offline.plan_batches`, the planner of `ModelRunner.run_requests`)."""
    layout = layout_for(mode, batch_size, seq_len, max_valid_num)
    return [Batch(idx, layout, placement) for idx, placement in plan_batches(layout, lengths, algorithm, seq_len)]


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
