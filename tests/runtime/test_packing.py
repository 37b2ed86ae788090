"""Packing algorithms (`pack`), the online packer of one batch (`OnlinePacker`) and a batch's length groups (`length_groups`)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poprt_lite.errors import PoprtError, RequestError
import itertools

from poprt_lite.runtime.packing import CALL_COST_IN_PAIRS, MAX_PAIRS_PER_CALL, OnlinePacker, PackAlgorithm, length_groups, pack, packing_efficiency


@st.composite
def problems(draw):
    capacity = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(1, capacity), max_size=60))
    max_items = draw(st.none() | st.integers(1, 8))
    return lengths, capacity, max_items


@pytest.mark.parametrize("algorithm", list(PackAlgorithm))
@given(problem=problems())
def test_pack_respects_limits_and_places_every_item_once(algorithm, problem):
    lengths, capacity, max_items = problem
    bins = pack(lengths, algorithm, bin_capacity=capacity, max_items_per_bin=max_items)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert b
        assert sum(lengths[i] for i in b) <= capacity
        assert max_items is None or len(b) <= max_items
    if bins:
        assert len(bins) >= -(-sum(lengths) // capacity)


@given(problem=problems())
def test_online_algorithms_keep_arrival_order(problem):
    lengths, capacity, max_items = problem
    next_fit = pack(lengths, "next_fit", bin_capacity=capacity, max_items_per_bin=max_items)
    assert [i for b in next_fit for i in b] == list(range(len(lengths)))
    first_fit = pack(lengths, "first_fit", bin_capacity=capacity, max_items_per_bin=max_items)
    assert all(b == sorted(b) for b in first_fit)
    assert len(first_fit) <= len(next_fit)


@pytest.mark.parametrize(
    "algorithm, expected",
    [
        ("next_fit", [[0], [1, 2], [3, 4]]),
        ("first_fit", [[0, 2, 4], [1], [3]]),
        ("best_fit_decreasing", [[1, 2], [3, 4], [0]]),  # 3 goes to the fullest bin (7)
        ("spfhp", [[1], [0, 2], [3, 4]]),  # 3 goes to the shortest pack (5)
        ("longest_first", [[1], [3], [0, 2, 4]]),  # 7 | 6 | 5 3 2: consecutive runs, longest first
    ],
)
def test_pack_small_example(algorithm, expected):
    bins = pack([5, 7, 3, 6, 2], PackAlgorithm(algorithm), bin_capacity=10)
    assert sorted(bins) == sorted(expected)


@given(problem=problems())
def test_longest_first_cuts_the_sorted_order_into_runs(problem):
    lengths, capacity, max_items = problem
    bins = pack(lengths, "longest_first", bin_capacity=capacity, max_items_per_bin=max_items)
    assert [i for b in bins for i in b] == np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()


def test_spfhp_fills_identical_packs_together():
    bins = pack([6, 6, 6, 6, 4, 4, 4], "spfhp", bin_capacity=10)
    assert sorted(bins) == [[0, 4], [1, 5], [2, 6], [3]]
    bins = pack([3] * 7, "spfhp", bin_capacity=10, max_items_per_bin=2)
    assert sorted(map(len, bins)) == [1, 2, 2, 2]


def test_offline_algorithms_reach_the_optimum_on_the_guide_distribution():
    np.random.seed(2023)
    lengths = np.clip(np.random.normal(128, 128, 1600).astype(np.int32), 1, 256)
    # 808 is the Martello-Toth L2 lower bound for these lengths in bins of 256.
    for algorithm in (PackAlgorithm.best_fit_decreasing, PackAlgorithm.spfhp):
        bins = pack(lengths, algorithm, bin_capacity=256)
        assert len(bins) == 808
        assert packing_efficiency(lengths, bins, 256) == pytest.approx(0.98860, abs=1e-5)
    # unpack/repack geometry: 16 x 256 tokens and at most 40 requests per batch
    for algorithm in ("first_fit", "best_fit_decreasing", "spfhp"):
        bins = pack(lengths, algorithm, bin_capacity=16 * 256, max_items_per_bin=40)
        assert len(bins) == 50, algorithm  # ceil(total tokens / 4096); SPFHP alone makes 59


def test_packing_efficiency():
    assert packing_efficiency([3, 5, 2], [[0, 1], [2]], 10) == 0.5
    assert packing_efficiency([], [], 10) == 0.0


@pytest.mark.parametrize(
    "lengths, message",
    [
        ([3, 300], "item 1 has length 300; lengths must be between 1 and the bin capacity 256"),
        ([0], "item 0 has length 0; lengths must be between 1 and the bin capacity 256"),
    ],
)
def test_pack_rejects_bad_lengths(lengths, message):
    with pytest.raises(PoprtError) as info:
        pack(lengths, "first_fit", bin_capacity=256)
    assert str(info.value) == message


def test_unknown_algorithm():
    with pytest.raises(PoprtError) as info:
        pack([1], "best_fit", bin_capacity=4)
    assert str(info.value) == (
        "unknown packing algorithm 'best_fit'; "
        "choose one of first_fit, next_fit, best_fit_decreasing, spfhp, longest_first"
    )
    with pytest.raises(PoprtError) as info:
        OnlinePacker("spfhp", 2, 8, 4, False)
    assert str(info.value) == (
        "spfhp packs a whole dataset at once; online packing supports first_fit and next_fit"
    )


@pytest.mark.parametrize(
    "algorithm, placements",
    [
        ("first_fit", [(0, 0), (1, 0), (0, 6), (1, 6)]),
        ("next_fit", [(0, 0), (1, 0), (1, 6)]),
    ],
)
def test_online_packer_rows(algorithm, placements):
    packer = OnlinePacker(algorithm, batch_size=2, seq_len=10, max_valid_num=5, across_rows=False)
    added = [packer.try_add(n) for n in (6, 6, 3, 4)]
    assert added == [True] * len(placements) + [False] * (4 - len(placements))
    assert packer.placements() == placements
    assert len(packer) == len(placements)


def test_online_packer_across_rows_and_limits():
    packer = OnlinePacker("first_fit", 2, 10, max_valid_num=5, across_rows=True)
    assert [packer.try_add(n) for n in (6, 6, 3, 4, 2)] == [True] * 4 + [False]
    assert packer.placements() == [0, 6, 12, 15] and not packer.is_full
    assert packer.try_add(1) and packer.is_full
    packer.reset()
    assert len(packer) == 0 and packer.placements() == [] and not packer.is_full
    packer = OnlinePacker("next_fit", 4, 10, max_valid_num=2, across_rows=False)
    assert [packer.try_add(1) for _ in range(3)] == [True, True, False]
    assert packer.is_full


def test_without_gaps_closes_up_what_a_withdrawn_request_leaves():
    rows = OnlinePacker("first_fit", batch_size=2, seq_len=10, max_valid_num=5, across_rows=False)
    assert [rows.try_add(n) for n in (6, 6, 3, 1)] == [True] * 4  # rows: [6, 3, 1] and [6]
    starts = rows.starts()
    assert starts.tolist() == [0, 10, 6, 9]
    # the first 6 withdrawn: the 3 and the 1 move to the front of row 0; the second 6 keeps row 1
    assert rows.without_gaps(starts[[1, 2, 3]], np.array([6, 3, 1])).tolist() == [10, 0, 3]
    stream = OnlinePacker("first_fit", 2, 10, max_valid_num=5, across_rows=True)
    assert [stream.try_add(n) for n in (6, 6, 3)] == [True] * 3
    assert stream.without_gaps(stream.starts()[[0, 2]], np.array([6, 3])).tolist() == [0, 6]


def test_online_packer_rejects_long_requests():
    packer = OnlinePacker("first_fit", 2, 256, 4, across_rows=False)
    with pytest.raises(RequestError) as info:
        packer.try_add(300)
    assert str(info.value) == (
        "request has 300 tokens, outside 1..256 (seq_len); truncate or drop it"
    )
    packer = OnlinePacker("first_fit", 2, 256, 4, across_rows=True, segment_max_size=128)
    with pytest.raises(RequestError) as info:
        packer.try_add(200)
    assert str(info.value) == (
        "request has 200 tokens, outside 1..128 (segment_max_size); truncate or drop it"
    )


@given(
    algorithm=st.sampled_from(["first_fit", "next_fit"]),
    across_rows=st.booleans(),
    batch_size=st.integers(1, 4),
    seq_len=st.integers(1, 12),
    max_valid_num=st.integers(1, 10),
    data=st.data(),
)
def test_online_packer_invariants(algorithm, across_rows, batch_size, seq_len, max_valid_num, data):
    packer = OnlinePacker(algorithm, batch_size, seq_len, max_valid_num, across_rows)
    lengths = data.draw(st.lists(st.integers(1, seq_len), max_size=30))
    placed = []
    for n in lengths:
        before = packer.placements()
        if packer.try_add(n):
            placed.append(n)
        else:
            assert packer.placements() == before
            if algorithm == "first_fit" and not across_rows and len(placed) < max_valid_num:
                fill = np.zeros(batch_size, dtype=int)
                for (row, _), m in zip(before, placed, strict=True):
                    fill[row] += m
                assert (fill + n > seq_len).all()  # first fit tried every row
    assert len(packer) == len(placed) <= max_valid_num
    owner = np.full(batch_size * seq_len, -1)
    places = packer.placements()
    for k, (place, n) in enumerate(zip(places, placed, strict=True)):
        start = place if across_rows else place[0] * seq_len + place[1]
        assert across_rows or place[1] + n <= seq_len  # a request stays in its row
        assert (owner[start : start + n] == -1).all()
        owner[start : start + n] = k
    if across_rows:
        assert places == list(np.cumsum([0] + placed)[:-1])
    else:  # each row's requests are contiguous from column 0
        used = owner.reshape(batch_size, seq_len) >= 0
        assert (np.sort(used, axis=1)[:, ::-1] == used).all()
        if algorithm == "next_fit":
            assert [r for r, _ in places] == sorted(r for r, _ in places)
    full = packer.is_full
    assert packer.try_add(1) is not full


# ---------------------------------------------------------------------------------- length groups


def group_cost(lengths, groups, call_cost):
    """What length_groups minimises: each group's requests padded to its longest, plus a call each."""
    return sum(len(g) * int(np.max(lengths[g])) ** 2 + call_cost for g in groups)


def test_length_groups_examples():
    lengths = [3] * 10 + [200]
    assert [g.tolist() for g in length_groups(lengths)] == [list(range(10)), [10]]  # 10 x 200**2 padded pairs saved
    assert [g.tolist() for g in length_groups([12] * 32)] == [list(range(32))]
    assert [g.tolist() for g in length_groups([40, 7, 39, 8])] == [[1, 3, 2, 0]]  # 4 x 40**2 < a second call
    assert [g.tolist() for g in length_groups([40, 7, 39, 8], call_cost=0)] == [[1], [3], [2], [0]]
    assert length_groups([]) == []
    # five of 250 tokens: 62,500 pairs each, at most two per call (MAX_PAIRS_PER_CALL)
    assert [g.tolist() for g in length_groups([250] * 5)] == [[0], [1, 2], [3, 4]]
    assert [g.tolist() for g in length_groups([300])] == [[0]]  # over the bound alone: still one call
    assert (CALL_COST_IN_PAIRS, MAX_PAIRS_PER_CALL) == (8000, 150_000)


@given(
    st.lists(st.integers(1, 256), min_size=1, max_size=8),
    st.sampled_from([0, 500, 8000, 10**9]),
    st.sampled_from([1, 20_000, 150_000, 10**12]),
)
def test_length_groups_is_the_cheapest_split_of_the_sorted_lengths(lengths, call_cost, max_pairs):
    lengths = np.asarray(lengths)
    groups = length_groups(lengths, call_cost, max_pairs)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # every request once
    flat = lengths[np.concatenate(groups)]
    assert (np.diff(flat) >= 0).all()  # groups of consecutive lengths, shortest first

    def allowed(split):
        return all(len(g) == 1 or len(g) * int(np.max(lengths[g])) ** 2 <= max_pairs for g in split)

    assert allowed(groups)
    order = np.argsort(lengths, kind="stable")
    splits = (np.split(order, cuts) for k in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), k))
    assert group_cost(lengths, groups, call_cost) == min(group_cost(lengths, split, call_cost) for split in splits if allowed(split))
