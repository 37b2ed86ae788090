"""Property tests for packing: every algorithm, both layouts, random length lists.

- `pack` (offline bin packing, all four algorithms): packs respect the capacity and the item limit,
  and every request is placed exactly once.
- `pack_data` / `unpack_outputs` (the host side of both packed layouts): each batch respects
  `max_valid_num`, `segment_max_size` and the row size, requests never overlap, a batch stops only
  when the next request does not fit, and unpacking a model output built from the packed inputs
  gives every request its own tokens back (unpack(pack(x)) == x).

The default suite runs ~100 examples per property; `pytest -m slow` runs 2000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.ops.unpack import Unpack
from poprt_lite.runtime.packing_utils import pack_data, unpack_outputs
from poprt_lite.runtime import modes
from poprt_lite.runtime.packing import PackAlgorithm, pack
from poprt_lite.vocab import PackMode

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- offline packing: pack() ------------------------------------------------------------------


@st.composite
def bin_problems(draw):
    capacity = draw(st.integers(1, 512))
    # a mix of distributions: anything, many duplicates (histogram packing), mostly short
    length = st.integers(1, capacity)
    short = st.integers(1, max(1, capacity // 8))
    few_values = st.sampled_from(sorted({1, capacity, max(1, capacity // 2), max(1, capacity // 3), max(1, capacity - 1)}))
    lengths = draw(st.lists(st.one_of(length, short, few_values), max_size=150))
    max_items = draw(st.none() | st.integers(1, 64))
    algorithm = draw(st.sampled_from(list(PackAlgorithm)))
    return lengths, capacity, max_items, algorithm


def check_pack(problem) -> None:
    lengths, capacity, max_items, algorithm = problem
    given_lengths = np.asarray(lengths, dtype=np.int64)
    bins = pack(given_lengths, algorithm, bin_capacity=capacity, max_items_per_bin=max_items)
    assert given_lengths.tolist() == lengths  # the input is not modified
    placed = [i for b in bins for i in b]
    assert sorted(placed) == list(range(len(lengths)))  # nothing lost, nothing duplicated
    for b in bins:
        assert b, "empty bin"
        assert sum(lengths[i] for i in b) <= capacity
        assert max_items is None or len(b) <= max_items
    tokens_bound = -(-sum(lengths) // capacity)
    count_bound = -(-len(lengths) // max_items) if max_items else min(len(lengths), 1)
    assert len(bins) >= max(tokens_bound, count_bound)
    if algorithm is PackAlgorithm.next_fit:
        assert placed == list(range(len(lengths)))  # arrival order, one open bin
    if algorithm is PackAlgorithm.first_fit:
        assert all(b == sorted(b) for b in bins)
    assert pack(lengths, algorithm, bin_capacity=capacity, max_items_per_bin=max_items) == bins  # deterministic


@FAST
@given(problem=bin_problems())
def test_pack_respects_limits_and_places_everything_once(problem):
    check_pack(problem)


@pytest.mark.slow
@SLOW
@given(problem=bin_problems())
def test_pack_respects_limits_and_places_everything_once_slow(problem):
    check_pack(problem)


@FAST
@given(
    capacity=st.integers(1, 100),
    lengths=st.lists(st.integers(1, 100), max_size=20),
    bad=st.one_of(st.integers(-5, 0), st.integers(101, 10_000)),
    where=st.integers(0, 20),
    algorithm=st.sampled_from(list(PackAlgorithm)),
)
def test_pack_refuses_impossible_lengths(capacity, lengths, bad, where, algorithm):
    lengths = [min(n, capacity) for n in lengths]
    where = min(where, len(lengths))
    lengths.insert(where, bad if bad <= 0 else capacity + bad)
    with pytest.raises(PoprtError, match=rf"^item {where} has length -?\d+; lengths must be between 1 and the bin capacity {capacity}$"):
        pack(lengths, algorithm, bin_capacity=capacity)


# --- host packing: pack_data() / unpack_outputs() ---------------------------------------------


@dataclass
class Request:
    input_ids: np.ndarray
    input_len: int
    token_type_ids: np.ndarray | None = None


@st.composite
def datasets(draw):
    mode = draw(st.sampled_from(list(PackMode)))
    across_rows = mode is not PackMode.attention_mask
    batch_size = 1 if not modes.get(mode).static else draw(st.integers(1, 6))  # token_stream: seq_len = max_tokens
    seq_len = draw(st.integers(1, 48))
    max_valid_num = draw(st.integers(1, 16))
    if across_rows:
        segment_max_size = draw(st.none() | st.integers(1, batch_size * seq_len))
        longest = segment_max_size or seq_len
    else:
        segment_max_size, longest = None, seq_len
    algorithm = draw(st.sampled_from([None, "first_fit", "next_fit"]))
    position_offset = draw(st.sampled_from([0, 2]))
    lengths = draw(st.lists(st.integers(1, longest) | st.integers(1, max(1, longest // 4)), min_size=1, max_size=40))
    seed = draw(st.integers(0, 2**32 - 1))
    with_types = draw(st.booleans())
    rng = np.random.default_rng(seed)
    requests = []
    for n in lengths:
        extra = int(rng.integers(0, 3))  # tokens past input_len must be ignored
        ids = rng.integers(1, 30_000, n + extra)
        types = rng.integers(1, 3, n + extra) if with_types else None
        requests.append(Request(ids, n, types))
    dynamic_rows = modes.get(mode).static and draw(st.booleans())  # --dynamic_rows artifacts
    config = dict(
        batch_size=batch_size, seq_len=seq_len, max_valid_num=max_valid_num, across_rows=across_rows,
        position_offset=position_offset, algorithm=algorithm, segment_max_size=segment_max_size, mode=mode,
        dynamic_rows=dynamic_rows,
    )
    return requests, config


def fake_output(batch, packed: np.ndarray, config) -> np.ndarray:
    """What a model returning its (packed) input per token would return, with a feature axis."""
    features = np.stack([packed, -packed], axis=-1)
    if config["mode"] is not PackMode.unpack_repack:
        return features  # AttentionMask and token_stream modes: outputs keep the packed [B, S, ...] / [1, T, ...] layout
    longest = config["segment_max_size"] or config["seq_len"]
    # unpack/repack mode: the model's Unpack op turns the packed stream into one row per request
    return Unpack.compute(features, batch.unpack_info, max_valid_num=config["max_valid_num"], segment_max_size=longest, dynamic=0)


def check_batch(requests, config, index: int, batch) -> None:
    B, S = config["batch_size"], config["seq_len"]
    across_rows, max_valid_num = config["across_rows"], config["max_valid_num"]
    specs = batch.specs
    n = len(specs)
    lengths = [r.input_len for r in requests[index : batch.count]]
    assert 1 <= n <= max_valid_num
    assert [s.index for s in specs] == list(range(index, batch.count))
    assert [s.length for s in specs] == lengths
    stream = not modes.get(config["mode"]).static
    shape = (1, sum(lengths)) if stream else (B, S)  # a token stream is as long as its real tokens
    if config["dynamic_rows"]:  # only the rows up to the last one a request uses
        shape = (max((s.row * S + s.offset + s.length - 1) // S for s in batch.specs) + 1, S)
    for name, array in batch.data.items():
        assert array.shape == shape and array.dtype == np.int32, name
    assert batch.unpack_info.tolist() == lengths + ([] if stream else [0] * (max_valid_num - n))

    # where every request lies: in bounds, no overlap, and the mask marks exactly those tokens
    occupied = np.zeros(shape[0] * shape[1], dtype=np.int64)
    for s in specs:
        assert 0 <= s.row < shape[0] and 0 <= s.offset < max(shape[1], S)
        start = s.row * S + s.offset
        if across_rows:
            assert s.length <= (config["segment_max_size"] or S)
            assert start + s.length <= B * S
        else:
            assert s.offset + s.length <= S  # one row per request
        occupied[start : start + s.length] += 1
    assert occupied.max() <= 1
    mask = batch.data["attention_mask"].reshape(-1)
    assert np.array_equal(mask != 0, occupied == 1)
    assert not batch.data["input_ids"].reshape(-1)[occupied == 0].any()  # padding is 0
    if across_rows:
        # one after another in the flat token stream, as the Unpack op expects
        assert [s.row * S + s.offset for s in specs] == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        assert set(mask.tolist()) <= {0, 1}
    else:
        # segment ids 1, 2, ... per row, in column order, packed from column 0
        for row in range(shape[0]):
            in_row = sorted((s for s in specs if s.row == row), key=lambda s: s.offset)
            expected = np.zeros(S, dtype=np.int32)
            column = 0
            for k, s in enumerate(in_row, 1):
                assert s.offset == column
                expected[column : column + s.length] = k
                column += s.length
            assert np.array_equal(batch.data["attention_mask"][row], expected)

    # the batch stops only when the next request does not fit
    if batch.count < len(requests) and n < max_valid_num:
        following = requests[batch.count].input_len
        if across_rows:
            assert sum(lengths) + following > B * S
        else:
            fill = [sum(s.length for s in specs if s.row == r) for r in range(B)]
            if config["algorithm"] == "first_fit":
                assert all(f + following > S for f in fill)
            else:  # next_fit (the default in AttentionMask mode): only the last opened row is open
                last = max(s.row for s in specs)
                assert last == B - 1 and fill[last] + following > S

    # unpack(pack(x)) == x, for every input that carries per-token values
    offset = config["position_offset"]
    per_request = {
        "input_ids": [r.input_ids[: r.input_len] for r in requests[index : batch.count]],
        "position_ids": [np.arange(r.input_len) + offset for r in requests[index : batch.count]],
    }
    if "token_type_ids" in batch.data:
        per_request["token_type_ids"] = [r.token_type_ids[: r.input_len] for r in requests[index : batch.count]]
    for name, expected in per_request.items():
        unpacked = unpack_outputs(batch, fake_output(batch, batch.data[name], config), across_rows)
        assert len(unpacked) == n
        for got, want in zip(unpacked, expected, strict=True):
            assert got.shape == (len(want), 2)
            assert np.array_equal(got[:, 0], want) and np.array_equal(got[:, 1], -want), name


def check_round_trip(case) -> None:
    requests, config = case
    index, batches = 0, 0
    while index < len(requests):
        batch = pack_data(requests, index, **config)
        assert batch.count > index  # progress: a request that fits an empty batch is always taken
        check_batch(requests, config, index, batch)
        index, batches = batch.count, batches + 1
    assert index == len(requests)
    assert batches >= -(-len(requests) // config["max_valid_num"])


@FAST
@given(case=datasets())
def test_pack_data_unpack_outputs_round_trip(case):
    check_round_trip(case)


@pytest.mark.slow
@SLOW
@given(case=datasets())
def test_pack_data_unpack_outputs_round_trip_slow(case):
    check_round_trip(case)


@FAST
@given(case=datasets(), extra=st.integers(1, 50), where=st.integers(0, 39))
def test_pack_data_refuses_a_request_that_can_never_fit(case, extra, where):
    """A request longer than the layout allows is a RequestError naming it, wherever it sits."""
    requests, config = case
    longest = config["segment_max_size"] or config["seq_len"] if config["across_rows"] else config["seq_len"]
    where = min(where, len(requests) - 1)
    n = longest + extra
    requests[where] = Request(np.ones(n, dtype=np.int64), n)
    limit = "segment_max_size" if config["across_rows"] and config["segment_max_size"] else "seq_len"
    message = rf"^datasets\[{where}\] has {n} tokens, outside 1\.\.{longest} \({limit}\); truncate or drop it$"
    with pytest.raises(RequestError, match=message):
        index = 0
        while index < len(requests):
            index = pack_data(requests, index, **config).count
