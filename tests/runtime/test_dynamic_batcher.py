"""runtime/dynamic_batcher.py: the dynamic batcher takes up to max_batch waiting requests, pads them to the
longest, and hands each request its own tokens' outputs; bench/packer.py's dynamic plans."""

from __future__ import annotations

import threading
import time

import numpy as np

from poprt_lite.runtime.dynamic_batcher import DynamicBatcher
from poprt_lite.bench.packer import plan_dynamic
from poprt_lite.vocab import Role

INPUTS = {"input_ids": (Role.dynamic_input, np.dtype(np.int64)), "attention_mask": (Role.attention_mask, np.dtype(np.int64))}


class GatedSession:
    """Stands in for onnxruntime: records each batch's feeds, waits for `gate` before answering,
    and answers `ids * 10 + mask` per token, so a wrong split or padding shows in the outputs."""

    def __init__(self) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        self.gate = threading.Event()

    def run(self, names, feeds):
        self.gate.wait(10)
        self.batches.append(feeds)
        return [feeds["input_ids"].astype(np.float32) * 10 + feeds["attention_mask"]]


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def request(ids: list[int]) -> tuple[dict, dict]:
    return {"input_ids": np.asarray(ids, np.int64)}, {"out": np.full(8, -1.0, np.float32)}


def test_full_batch_at_once_then_timeout():
    session = GatedSession()
    session.gate.set()
    with DynamicBatcher(session, INPUTS, ["out"], max_batch=3, timeout_microseconds=30_000_000) as batcher:
        session.gate.clear()
        reqs = [request(ids) for ids in ([1, 2], [3], [4, 5, 6], [7])]
        futures = [batcher.execute_async(*r) for r in reqs[:3]]  # three wait: a full batch, at once
        session.gate.set()
        for f in futures:
            f.result(10)
        assert [b["input_ids"].tolist() for b in session.batches] == [[[1, 2, 0], [3, 0, 0], [4, 5, 6]]]
        assert session.batches[0]["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
        for (feeds, outputs), ids in zip(reqs[:3], ([1, 2], [3], [4, 5, 6]), strict=True):
            n = len(ids)
            assert outputs["out"][:n].tolist() == [i * 10 + 1 for i in ids]  # its own tokens only
            assert (outputs["out"][n:] == -1).all()
        assert batcher.stats.batches == 1 and batcher.stats.batches_by_timeout == 0
        batcher.execute_async(*reqs[3])
    # close() ran the last request, alone, though it had not waited its timeout
    assert reqs[3][1]["out"][0] == 71
    stats = batcher.stats
    assert (stats.batches, stats.requests, stats.tokens, stats.token_slots) == (2, 4, 7, 9 + 1)


def test_timeout_launches_a_partial_batch():
    session = GatedSession()
    session.gate.set()
    with DynamicBatcher(session, INPUTS, ["out"], max_batch=16, timeout_microseconds=1000) as batcher:
        feeds, outputs = request([9, 8])
        batcher.execute_async(feeds, outputs).result(10)
        assert outputs["out"][:2].tolist() == [91, 81]
        assert batcher.stats.batches_by_timeout == 1


def test_per_request_batcher_runs_each_alone_in_arrival_order():
    session = GatedSession()
    with DynamicBatcher(session, INPUTS, ["out"], max_batch=1, timeout_microseconds=0) as batcher:
        futures = [batcher.execute_async(*request([k] * k)) for k in (1, 2, 3)]
        session.gate.set()
        for f in futures:
            f.result(10)
    assert [b["input_ids"].tolist() for b in session.batches] == [[[1]], [[2, 2]], [[3, 3, 3]]]


def test_plan_dynamic():
    lengths = np.array([5, 2, 7, 2, 3])
    sorted_plans = plan_dynamic(lengths, 2, sort=True)
    assert [p.indices.tolist() for p in sorted_plans] == [[1, 3], [4, 0], [2]]
    assert [p.layout.shape(p.placement) for p in sorted_plans] == [(2, 2), (2, 5), (1, 7)]
    assert sorted_plans[1].placement.starts.tolist() == [0, 5]
    alone = plan_dynamic(lengths, 1, sort=False)
    assert [(p.indices.tolist(), p.slots) for p in alone] == [([0], 5), ([1], 2), ([2], 7), ([3], 2), ([4], 3)]


def test_token_budget_counts_padded_slots():
    """TEI's budget on a padded model: k x longest slots; the request that would pass it waits."""
    session = GatedSession()
    with DynamicBatcher(session, INPUTS, ["out"], max_batch=8, timeout_microseconds=0, max_tokens=6) as batcher:
        first = batcher.execute_async(*request([9]))
        wait_until(lambda: batcher.pending == 0)  # the serving thread holds [9], waiting for the gate
        futures = [batcher.execute_async(*request(ids)) for ids in ([1], [2, 2], [3, 3, 3], [4])]
        session.gate.set()
        for f in [first, *futures]:
            f.result(10)
    # [1] + [2, 2] = 2 x 2 = 4 slots; adding [3, 3, 3] would make 3 x 3 = 9 > 6
    assert [b["input_ids"].tolist() for b in session.batches] == [[[9]], [[1, 0], [2, 2]], [[3, 3, 3], [4, 0, 0]]]
    assert [f.batch.requests for f in futures] == [2, 2, 2, 2]
    assert [f.batch.token_slots for f in futures] == [4, 4, 6, 6]


def test_per_request_outputs_take_their_row():
    class Pooled(GatedSession):
        def run(self, names, feeds):
            self.batches.append(feeds)
            return [feeds["input_ids"].sum(axis=1, keepdims=True).astype(np.float32)]

    with DynamicBatcher(Pooled(), INPUTS, ["pooled"], max_batch=4, timeout_microseconds=0, per_request=["pooled"]) as batcher:
        rows = [{"pooled": np.zeros(1, np.float32)} for _ in range(3)]
        futures = [batcher.execute_async({"input_ids": np.asarray(ids, np.int64)}, out) for ids, out in zip(([1], [2, 3], [4, 5, 6]), rows, strict=True)]
        for f in futures:
            f.result(10)
    assert [r["pooled"].tolist() for r in rows] == [[1.0], [5.0], [15.0]]
