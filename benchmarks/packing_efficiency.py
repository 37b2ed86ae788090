"""Packing efficiency of every algorithm on the length distribution of PopRT's packed BERT example.

1600 lengths from clip(Normal(128, 128), 1, 256) (np.random.seed(2023), drawn as the example does),
packed for seq_len 256 in both modes:
- unpack/repack: one bin per batch of 16 x 256 tokens holding at most 40 requests;
- AttentionMask: one bin per row of 256 tokens;
plus `packing_utils.pack_data` (batches of 16 x 256, max_valid_num 40, requests in order) and
the padded baseline. Efficiency is real tokens / allocated tokens. `bound` is a lower bound on the
number of bins (Martello-Toth L2 for rows; tokens and request count for batches).

Run from the repository root: python benchmarks/packing_efficiency.py (with poprt-lite installed,
or PYTHONPATH=.).
"""

import time
from types import SimpleNamespace

import numpy as np

from poprt_lite.runtime import packing_utils
from poprt_lite.runtime.packing import PackAlgorithm, pack

SEQ_LEN, BATCH_SIZE, MAX_VALID_NUM, DATASET_SIZE = 256, 16, 40, 1600


def row_lower_bound(lengths: np.ndarray, capacity: int) -> int:
    """Martello-Toth L2 lower bound on the number of bins."""
    best = 0
    for k in range(capacity // 2 + 1):
        big = lengths[lengths > capacity - k]
        mid = lengths[(lengths > capacity // 2) & (lengths <= capacity - k)]
        small = lengths[(lengths >= k) & (lengths <= capacity // 2)]
        spill = small.sum() - (len(mid) * capacity - mid.sum())
        best = max(best, len(big) + len(mid) + max(0, -(-int(spill) // capacity)))
    return best


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs) and its run time in microseconds per request."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, (time.perf_counter() - start) / DATASET_SIZE * 1e6


def count_batches(datasets, across_rows: bool, algorithm: str) -> int:
    """Batches `packing_utils.pack_data` needs for the whole dataset."""
    index, batches = 0, 0
    while index < len(datasets):
        batch = packing_utils.pack_data(
            datasets, index, BATCH_SIZE, SEQ_LEN, MAX_VALID_NUM, 1, across_rows, algorithm=algorithm
        )
        index, batches = batch.count, batches + 1
    return batches


def count_padded_batches(datasets) -> int:
    """Batches `packing_utils.pad_data` needs for the whole dataset."""
    for index in range(0, len(datasets), BATCH_SIZE):
        packing_utils.pad_data(datasets, index, BATCH_SIZE, SEQ_LEN)
    return -(-len(datasets) // BATCH_SIZE)


def main() -> None:
    np.random.seed(2023)
    lengths = np.random.normal(SEQ_LEN // 2, SEQ_LEN // 2, DATASET_SIZE).astype(np.int32)
    lengths = np.clip(lengths, 1, SEQ_LEN)
    tokens, batch_tokens = int(lengths.sum()), BATCH_SIZE * SEQ_LEN
    header = ("mode", "algorithm", "bins", "bound", "efficiency", "us/req")
    table = ["{:<14} {:<20} {:>5} {:>5} {:>10} {:>7}".format(*header)]

    def add(mode, name, bins, bound, capacity, us):
        efficiency = tokens / (bins * capacity)
        table.append(f"{mode:<14} {name:<20} {bins:>5} {bound:>5} {efficiency:>10.2%} {us:>7.1f}")

    batch_bound = max(-(-tokens // batch_tokens), -(-DATASET_SIZE // MAX_VALID_NUM))
    rows_bound = row_lower_bound(lengths, SEQ_LEN)
    for algorithm in PackAlgorithm:
        bins, us = timed(
            pack, lengths, algorithm, bin_capacity=batch_tokens, max_items_per_bin=MAX_VALID_NUM
        )
        add("unpack/repack", algorithm.value, len(bins), batch_bound, batch_tokens, us)
    for algorithm in PackAlgorithm:
        bins, us = timed(pack, lengths, algorithm, bin_capacity=SEQ_LEN)
        add("AttentionMask", algorithm.value, len(bins), rows_bound, SEQ_LEN, us)

    datasets = [
        SimpleNamespace(
            input_ids=np.random.randint(0, 30522, n).astype(np.int32),
            token_type_ids=np.random.randint(0, 2, n).astype(np.int32),
            input_len=n,
        )
        for n in lengths
    ]
    for across_rows, mode, algorithm in (
        (True, "unpack/repack", "first_fit"),
        (False, "AttentionMask", "first_fit"),
        (False, "AttentionMask", "next_fit"),
    ):
        batches, us = timed(count_batches, datasets, across_rows, algorithm)
        add(mode, f"pack_data {algorithm}", batches, batch_bound, batch_tokens, us)
    batches, us = timed(count_padded_batches, datasets)
    add("padded", "pad_data", batches, batches, batch_tokens, us)

    print(f"{DATASET_SIZE} requests, {tokens} tokens, seq_len {SEQ_LEN}")
    print("\n".join(table))


if __name__ == "__main__":
    main()
