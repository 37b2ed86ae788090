"""runtime/offline.py: the offline planner's default per layout."""

import itertools

import numpy as np
import pytest

from poprt_lite.runtime.modes import layout_for
from poprt_lite.runtime.offline import default_algorithm, plan_batches
from poprt_lite.runtime.packing import PackAlgorithm
from poprt_lite.vocab import PackMode

LENGTHS = np.random.default_rng(7).integers(1, 65, 300)


@pytest.mark.parametrize(
    "mode, expected",
    [
        (PackMode.token_stream, PackAlgorithm.longest_first),
        (PackMode.attention_mask, PackAlgorithm.best_fit_decreasing),
        (PackMode.unpack_repack, PackAlgorithm.best_fit_decreasing),
    ],
)
def test_default_algorithm(mode, expected):
    assert default_algorithm(layout_for(mode, 4, 64, 16)) is expected


def attention_cost(batches) -> int:
    """What token_stream's attention computes per batch: every request padded to the batch's longest."""
    return sum(len(p.lengths) * int(p.lengths.max()) ** 2 for _, p in batches)


def test_token_stream_batches_hold_requests_of_similar_length():
    layout = layout_for(PackMode.token_stream, 1, 256, 16)
    batches = plan_batches(layout, LENGTHS)
    assert sorted(i for idx, _ in batches for i in idx.tolist()) == list(range(len(LENGTHS)))
    ranges = sorted(((int(p.lengths.min()), int(p.lengths.max())) for _, p in batches), reverse=True)
    assert all(lower[1] <= upper[0] for upper, lower in itertools.pairwise(ranges))  # runs of the sorted order
    topped_up = plan_batches(layout, LENGTHS, PackAlgorithm.best_fit_decreasing)
    assert attention_cost(batches) < 0.8 * attention_cost(topped_up)


@pytest.mark.parametrize("algorithm", [PackAlgorithm.first_fit, PackAlgorithm.best_fit_decreasing])
def test_token_stream_batches_run_as_their_length_groups(algorithm):
    """A planned token_stream batch of mixed lengths is run as the calls `length_groups` makes of
    it; token_stream_loop, which attends at each request's own length, keeps one call per batch."""
    lengths = np.array([3] * 10 + [200])  # one batch of 230 tokens (max_tokens 256)
    calls = plan_batches(layout_for(PackMode.token_stream, 1, 256, 16), lengths, algorithm)
    assert [(idx.tolist(), p.starts.tolist()) for idx, p in calls] == [(list(range(10)), list(range(0, 30, 3))), ([10], [0])]
    (batch,) = plan_batches(layout_for(PackMode.token_stream_loop, 1, 256, 16), lengths, algorithm)
    assert sorted(batch[0].tolist()) == list(range(11))
