"""What the plain runner's check of packed feeds costs per batch (`check_packed_feeds`: requests read
back from the attention mask / unpack_info, their position ids compared with the artifact's offset).

Compiles the bundled tiny BERT at BERT-base's serving geometry (16 x 256, max_valid_num 40) in both
static packing modes, packs 60 batches of lengths clip(Normal(128, 128), 1, 256) with `pack_data`,
and times `ModelRunner.check_feeds` with and without the packed check, interleaved, 7 rounds
(median and spread). The model itself is not run: on BERT-base a batch takes ~3.2 s (README,
Performance).

Run from the repository root: python benchmarks/packed_feed_check.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import poprt_lite
from poprt_lite import runtime
from poprt_lite.runtime import packing_utils
from poprt_lite.vocab import PackMode

ROOT = Path(__file__).resolve().parents[1]
B, S, N, ROUNDS = 16, 256, 40, 7


def main() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(128, 128, 4000).astype(int), 1, S)
    datasets = [SimpleNamespace(input_ids=rng.integers(3, 1000, n), input_len=int(n)) for n in lengths]
    print(f"check_feeds per {B}x{S} batch (max_valid_num {N}), {ROUNDS} interleaved rounds, median [min-max] us")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (PackMode.unpack_repack, PackMode.attention_mask):
            options = poprt_lite.CompileOptions(
                input_shape={"input_ids": (B, S)}, pack_args={"max_valid_num": str(N), "segment_max_size": str(S), "mode": mode.value}
            )
            out = Path(tmp) / mode.value
            path = poprt_lite.compile(ROOT / "testdata" / "bert_qa_torchscript.onnx", out / "m.onnx", output_dir=out,
                                      export_popef=True, options=options).artifact
            runner = runtime.Runner(path)
            batches, index = [], 0
            while index < len(datasets) and len(batches) < 60:
                batch = packing_utils.pack_data(datasets, index, B, S, N, 1, artifact=runner)
                batches.append(batch.data)
                index = batch.count
            interface, times = runner.interface, {"with": [], "without": []}
            for _ in range(ROUNDS):
                for label, packed in (("with", interface), ("without", None)):
                    runner.interface = packed
                    start = time.perf_counter()
                    for feeds in batches:
                        runner.check_feeds(feeds)
                    times[label].append(1e6 * (time.perf_counter() - start) / len(batches))
            runner.interface = interface
            cells = {k: f"{np.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]" for k, v in times.items()}
            extra = np.median(times["with"]) - np.median(times["without"])
            print(f"{mode}: without the packed check {cells['without']}, with it {cells['with']}: +{extra:.0f} us per batch")


if __name__ == "__main__":
    main()
