"""What one benchmark run measures: its settings (`BenchConfig`), the workload presets, progress.

Two workloads (`--workload`), each with a full preset and a `--small` one (a tiny model, seconds):

- `seed` (default): PopRT's packed BERT example. BERT-base geometry (12 layers, hidden 768, 12 heads,
  intermediate 3072), 640 requests of `clip(int32(Normal(128, 128)), 1, 256)` tokens, batches of
  16 x 256, `max_valid_num=40`.
- `queries`: short search-style requests on MiniLM geometry (6 layers, hidden 384, 12 heads,
  intermediate 1536), 4000 requests of `clip(int32(Normal(12, 6)), 3, 128)` tokens, batches of
  16 x 128. `max_valid_num=256`: no batch of these requests reaches it (best-fit-decreasing puts at
  most ~180 in a batch), so rows, not the count, limit a batch.

Both use numpy seed 2023, a batching timeout of 15 ms and random weights exported at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poprt_lite.bench.export import BERT_BASE, MINILM, TINY, Geometry
from poprt_lite.bench.workload import LengthSpec
from poprt_lite.errors import PoprtError


@dataclass(frozen=True)
class Preset:
    """A workload's geometry and settings (every field of `BenchConfig` it names)."""

    geometry: Geometry
    values: dict[str, Any] = field(default_factory=dict)


WORKLOADS = ("seed", "queries")
PRESETS: dict[tuple[str, bool], Preset] = {  # (workload, small) -> preset
    ("seed", False): Preset(BERT_BASE, {
        "iterations": 40, "batch_size": 16, "avg_seq_len": 128, "std_seq_len": None, "min_seq_len": 1,
        "max_seq_len": 256, "max_valid_num": 40, "timeout_microseconds": 15000, "clients": None,
    }),
    ("seed", True): Preset(TINY, {
        "iterations": 8, "batch_size": 4, "avg_seq_len": 32, "std_seq_len": None, "min_seq_len": 1,
        "max_seq_len": 64, "max_valid_num": 10, "timeout_microseconds": 2000, "clients": None,
    }),
    ("queries", False): Preset(MINILM, {
        "iterations": 250, "batch_size": 16, "avg_seq_len": 12, "std_seq_len": 6, "min_seq_len": 3,
        "max_seq_len": 128, "max_valid_num": 256, "timeout_microseconds": 15000, "clients": 384,
    }),
    ("queries", True): Preset(TINY, {
        "iterations": 16, "batch_size": 4, "avg_seq_len": 6, "std_seq_len": 3, "min_seq_len": 3,
        "max_seq_len": 32, "max_valid_num": 48, "timeout_microseconds": 2000, "clients": 24,
    }),
}


@dataclass
class BenchConfig:
    workload: str = "seed"
    model: Path | None = None
    work_dir: Path | None = None
    iterations: int = 40
    batch_size: int = 16
    avg_seq_len: int = 128
    std_seq_len: int | None = None  # None: the mean (PopRT's draw)
    min_seq_len: int = 1
    max_seq_len: int = 256
    max_valid_num: int = 40
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core
    timeout_microseconds: int = 15000
    clients: int | None = None  # online concurrent clients; default 2 * max_valid_num
    offline_algorithm: str | None = None  # None: each layout's default (runtime.offline.default_algorithm)
    modes: tuple[str, ...] | None = None  # None: every mode
    seed: int = 2023
    op_costs: bool = True
    small: bool = False
    ort_fusions: bool = False  # run onnxruntime's transformer optimizer on every compiled model

    @classmethod
    def preset(cls, workload: str = "seed", small: bool = False, **overrides: Any) -> BenchConfig:
        """The preset of `workload`, with the `overrides` that are not None."""
        if workload not in WORKLOADS:
            raise PoprtError(f"workload must be one of {', '.join(WORKLOADS)}, got '{workload}'")
        values = dict(PRESETS[workload, small].values)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(workload=workload, small=small, **values)

    @property
    def geometry(self) -> Geometry:
        return PRESETS[self.workload, self.small].geometry

    @property
    def lengths(self) -> LengthSpec:
        return LengthSpec(self.avg_seq_len, self.max_seq_len, self.std_seq_len, self.min_seq_len)

    @property
    def requests(self) -> int:
        return self.iterations * self.batch_size

    @property
    def n_clients(self) -> int:
        return self.clients if self.clients else 2 * self.max_valid_num

    @property
    def n_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


class Progress:
    """What the benchmark tells its caller while it runs (the CLI draws progress bars)."""

    def step(self, message: str) -> None: ...

    def start(self, label: str, total: int) -> Any:
        """A bar for `total` requests; returns its handle."""

    def advance(self, n: int, task: Any) -> None: ...

    def finish(self, task: Any) -> None: ...
