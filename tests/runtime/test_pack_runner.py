"""PackRunner: online packing, threading, timeouts, failures, close(), config checks.

Most tests use small hand-built ONNX models with the interface of packed artifacts (both layouts),
whose outputs are exact functions of each request's tokens, so every request's result can be
checked against what the model gives for that request alone. End-to-end tests on the tiny BERT QA
export run when the packing passes are available.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import poprt_lite
from poprt_lite import ir, runtime
from poprt_lite.ir import artifact
from poprt_lite.errors import PoprtError, QueueFullError, RequestError
from poprt_lite.runtime import PackAlgorithm, PackRunner, PackRunnerConfig
from poprt_lite.runtime.pack_runner import PackFuture
from poprt_lite.vocab import PackMode

VOCAB = 1000
TESTDATA = Path(__file__).resolve().parents[2] / "testdata"

# ------------------------------------------------------------------------------ hand-built models


def _const(name, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))


def build_fake_model(mode: str, batch: int, seq: int, max_valid_num: int, segment_max_size: int,
                     position_offset: int = 0, id_dtype=TensorProto.INT64) -> onnx.ModelProto:
    """A packed-artifact look-alike. Per token: start = id + 1000*type + 0.25*position;
    end = sum of the ids of the token's request (needs a correct mask / unpack_info);
    hidden = [start, end]. unpack_repack mode adds pooled [N, 2] = [sum of ids, length]."""
    B, S, N, L = batch, seq, max_valid_num, segment_max_size
    inputs = [
        helper.make_tensor_value_info(n, id_dtype, [B, S])
        for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["token_type_ids"], ["tt_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        _const("k1000", 1000.0, np.float32),
        _const("kq", 0.25, np.float32),
        helper.make_node("Mul", ["tt_f", "k1000"], ["tt_s"]),
        helper.make_node("Mul", ["pos_f", "kq"], ["pos_s"]),
        helper.make_node("Add", ["ids_f", "tt_s"], ["v0"]),
        helper.make_node("Add", ["v0", "pos_s"], ["value"]),  # [B, S]
    ]
    layouts = {}
    if mode == "attention_mask":
        nodes += [
            _const("ax2", [2]),
            _const("ax1", [1]),
            _const("zero", 0),
            helper.make_node("Cast", ["attention_mask"], ["seg"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", ["seg", "ax2"], ["seg_i"]),
            helper.make_node("Unsqueeze", ["seg", "ax1"], ["seg_j"]),
            helper.make_node("Equal", ["seg_i", "seg_j"], ["same"]),
            helper.make_node("Greater", ["seg_j", "zero"], ["real"]),
            helper.make_node("And", ["same", "real"], ["visible"]),
            helper.make_node("Cast", ["visible"], ["visible_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["ids_f", "ax2"], ["ids_col"]),
            helper.make_node("MatMul", ["visible_f", "ids_col"], ["end3"]),  # [B, S, 1]
            helper.make_node("Squeeze", ["end3", "ax2"], ["end_logits"]),
            helper.make_node("Identity", ["value"], ["start_logits"]),
            helper.make_node("Unsqueeze", ["value", "ax2"], ["start3"]),
            helper.make_node("Concat", ["start3", "end3"], ["hidden"], axis=2),
        ]
        outputs = [
            helper.make_tensor_value_info("start_logits", TensorProto.FLOAT, [B, S]),
            helper.make_tensor_value_info("end_logits", TensorProto.FLOAT, [B, S]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [B, S, 2]),
        ]
        layouts = dict.fromkeys(["start_logits", "end_logits", "hidden"], "packed")
    else:
        inputs.append(helper.make_tensor_value_info("unpack_info", TensorProto.INT32, [N]))
        nodes += [
            _const("flat_shape", [-1]),
            _const("zero", 0),
            _const("one", 1),
            _const("L", L),
            _const("last", B * S - 1),
            _const("ax1", [1]),
            _const("ax2", [2]),
            _const("zero_f", 0.0, np.float32),
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["ids_f", "mask_f"], ["ids_masked"]),
            helper.make_node("Reshape", ["value", "flat_shape"], ["value_flat"]),
            helper.make_node("Reshape", ["ids_masked", "flat_shape"], ["ids_flat"]),
            helper.make_node("Cast", ["unpack_info"], ["lengths"], to=TensorProto.INT64),
            helper.make_node("CumSum", ["lengths", "zero"], ["starts"], exclusive=1),
            helper.make_node("Range", ["zero", "L", "one"], ["pos"]),
            helper.make_node("Unsqueeze", ["starts", "ax1"], ["starts_col"]),
            helper.make_node("Unsqueeze", ["lengths", "ax1"], ["lengths_col"]),
            helper.make_node("Add", ["starts_col", "pos"], ["index"]),
            helper.make_node("Min", ["index", "last"], ["index_c"]),
            helper.make_node("Less", ["pos", "lengths_col"], ["valid"]),
            helper.make_node("Gather", ["value_flat", "index_c"], ["g_value"]),
            helper.make_node("Where", ["valid", "g_value", "zero_f"], ["start_logits"]),
            helper.make_node("Gather", ["ids_flat", "index_c"], ["g_ids"]),
            helper.make_node("Where", ["valid", "g_ids", "zero_f"], ["ids_unpacked"]),
            helper.make_node("ReduceSum", ["ids_unpacked", "ax1"], ["row_sum"], keepdims=1),  # [N, 1]
            helper.make_node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["row_sum", "valid_f"], ["end_logits"]),
            helper.make_node("Unsqueeze", ["start_logits", "ax2"], ["start3"]),
            helper.make_node("Unsqueeze", ["end_logits", "ax2"], ["end3"]),
            helper.make_node("Concat", ["start3", "end3"], ["hidden"], axis=2),
            helper.make_node("Cast", ["lengths_col"], ["lengths_f"], to=TensorProto.FLOAT),
            helper.make_node("Concat", ["row_sum", "lengths_f"], ["pooled"], axis=1),
        ]
        outputs = [
            helper.make_tensor_value_info("start_logits", TensorProto.FLOAT, [N, L]),
            helper.make_tensor_value_info("end_logits", TensorProto.FLOAT, [N, L]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [N, L, 2]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [N, 2]),
        ]
        layouts = {**dict.fromkeys(["start_logits", "end_logits", "hidden"], "unpacked"), "pooled": "per_request"}
    graph = helper.make_graph(nodes, f"fake_{mode}", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    stored_mode = "unpack_repack" if mode == "unpack_repack" else "attention_mask"
    ir.set_metadata(model, "pack", json.dumps({"mode": stored_mode, "max_valid_num": N, "segment_max_size": L}))
    ir.set_metadata(model, "attention_masks", "{}")  # no attention: no mask term to account for
    ir.set_metadata(model, "position_offset", str(position_offset))
    ir.set_metadata(model, "vocab_size", str(VOCAB))
    for name, layout in layouts.items():
        ir.set_metadata(model, f"layout.{name}", layout)
    return model


def write_fake(path, mode, batch=2, seq=8, max_valid_num=4, segment_max_size=8, **kwargs):
    model = build_fake_model(mode, batch, seq, max_valid_num, segment_max_size, **kwargs)
    fields = {"source_sha256": "0" * 64, "precision": "fp32", "pipeline": []}
    return artifact.write_artifact(path / f"{mode}_{batch}x{seq}_{max_valid_num}.popef", model, fields)


def expected(ids, token_types=None, positions=None, offset=0):
    """What the fake models give for one request alone."""
    ids = np.asarray(ids, np.float64).reshape(-1)
    n = len(ids)
    tt = np.zeros(n) if token_types is None else np.asarray(token_types, np.float64).reshape(-1)
    pos = np.arange(n) + offset if positions is None else np.asarray(positions, np.float64).reshape(-1)
    start = ids + 1000 * tt + 0.25 * pos
    end = np.full(n, ids.sum())
    return {
        "start_logits": start,
        "end_logits": end,
        "hidden": np.stack([start, end], axis=1),
        "pooled": np.array([ids.sum(), n]),
    }


def make_request(rng, n, int32=False):
    dtype = np.int32 if int32 else np.int64
    return {
        "input_ids": rng.integers(3, VOCAB, n).astype(dtype),
        "attention_mask": np.ones(n, dtype),
        "token_type_ids": rng.integers(0, 2, n).astype(dtype),
    }


def out_arrays(runner, max_len, dtype=np.float32):
    arrays = {}
    for name, out in runner.interface.outputs.items():
        shape = out.trailing if out.layout == "per_request" else (max_len, *out.trailing)
        arrays[name] = np.full(shape, np.nan, dtype)
    return arrays


def check_outputs(outputs, feeds, offset=0, atol=0.0):
    n = len(np.asarray(feeds["input_ids"]).reshape(-1))
    want = expected(feeds["input_ids"], feeds.get("token_type_ids"), feeds.get("position_ids"), offset)
    for name, got in outputs.items():
        if name == "pooled":
            np.testing.assert_allclose(got, want[name], atol=atol, rtol=0)
        else:
            np.testing.assert_allclose(got[:n], want[name], atol=atol, rtol=0)


MODES = [
    ("unpack_repack", PackAlgorithm.first_fit),
    ("attention_mask", PackAlgorithm.first_fit),
    ("attention_mask", PackAlgorithm.next_fit),
]
STREAM = PackMode.token_stream.value
REAL_MODES = [*MODES, (STREAM, PackAlgorithm.first_fit)]  # compiled from the testdata exports


def config_for(mode, algorithm=PackAlgorithm.first_fit, **kwargs):
    config = PackRunnerConfig(**kwargs)
    config.algorithm = algorithm
    if mode == "attention_mask":
        config.enable_input_single_row_mode("attention_mask")
    return config


# --------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("mode, algorithm", MODES)
def test_single_requests_give_the_models_result(tmp_path, rng, mode, algorithm):
    path = write_fake(tmp_path, mode, position_offset=2)
    with runtime.Runner(path, config_for(mode, algorithm, timeout_microseconds=0)) as runner:
        assert isinstance(runner, PackRunner)
        for n in (1, 3, 8):
            feeds = make_request(rng, n, int32=True)
            outputs = out_arrays(runner, 8)
            assert runner.execute(feeds, outputs) is outputs
            check_outputs(outputs, feeds, offset=2)
            if "hidden" in outputs:  # positions past the request are left untouched
                assert np.isnan(outputs["start_logits"][n:]).all()


def test_given_position_ids_must_restart_at_the_offset(tmp_path, rng):
    path = write_fake(tmp_path, "unpack_repack", position_offset=2)
    with runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=0)) as runner:
        feeds = {**make_request(rng, 5), "position_ids": np.arange(5) + 2, "unpack_info": np.zeros(4, np.int32)}
        result = runner.execute_async(feeds).result(timeout=10)
        np.testing.assert_array_equal(result["start_logits"], expected(feeds["input_ids"], feeds["token_type_ids"], np.arange(5) + 2)["start_logits"])
        assert result["start_logits"].shape == (5,) and result["pooled"].shape == (2,)
        for positions, token in ((np.arange(5), 0), (np.array([2, 3, 9, 5, 6]), 2)):
            with pytest.raises(RequestError) as info:
                runner.execute_async({**feeds, "position_ids": positions})
            assert str(info.value) == (
                f"feed 'position_ids' has {positions[token]} at token {token}; a request's position ids are 2, 3, ... "
                "(the artifact's position offset is 2); leave them out and they are filled"
            )


def test_missing_token_type_ids_default_to_zero(tmp_path, rng):
    path = write_fake(tmp_path, "attention_mask")
    with runtime.Runner(path, config_for("attention_mask", timeout_microseconds=0)) as runner:
        ids = rng.integers(3, VOCAB, (1, 6))  # a leading batch axis of 1 is accepted
        result = runner.execute({"input_ids": ids})
        np.testing.assert_array_equal(result["start_logits"], expected(ids)["start_logits"])


# ---------------------------------------------------------------------------- many client threads


@pytest.mark.parametrize("mode, algorithm", MODES)
def test_many_clients_each_get_their_own_result(tmp_path, mode, algorithm):
    """32 threads x 200 requests of random lengths: none lost, none duplicated, all exact. The fake
    model's values are exact in float32, so a float32 answer must equal the request's alone bit for
    bit (a position off by one token changes start_logits by 0.25) and a float16 one must equal it
    rounded to float16."""
    path = write_fake(tmp_path, mode, batch=4, seq=64, max_valid_num=12, segment_max_size=64, position_offset=2)
    config = config_for(mode, algorithm, timeout_microseconds=2000)
    clients, per_client = 32, 200
    errors, done, tokens = [], [], []
    with runtime.Runner(path, config) as runner:

        def client(seed):
            rng = np.random.default_rng(seed)
            pending = []
            try:
                for k in range(per_client):
                    feeds = make_request(rng, int(rng.integers(1, 65)), int32=bool(k % 2))
                    outputs = {"start_logits": np.zeros(64, np.float16 if k % 3 == 0 else np.float32),
                               "end_logits": np.zeros(64, np.float32)}
                    if k % 4 == 0:  # mix blocking and asynchronous calls
                        runner.execute(feeds, outputs)
                        pending.append((None, feeds, outputs))
                    else:
                        pending.append((runner.execute_async(feeds, outputs), feeds, outputs))
                for future, feeds, outputs in pending:
                    if future is not None:
                        future.wait(timeout=30)
                    n = len(feeds["input_ids"])
                    want = expected(feeds["input_ids"], feeds["token_type_ids"], offset=2)
                    start = outputs["start_logits"]
                    np.testing.assert_array_equal(start[:n], want["start_logits"].astype(start.dtype))
                    np.testing.assert_array_equal(outputs["end_logits"][:n], want["end_logits"])
                    assert not start[n:].any() and not outputs["end_logits"][n:].any()
                done.append(len(pending))
                tokens.append(sum(len(feeds["input_ids"]) for _, feeds, _ in pending))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "clients did not finish"
        stats = runner.stats
    assert not errors, errors[0]
    assert sum(done) == clients * per_client
    assert stats.requests == clients * per_client and stats.failed_requests == 0
    assert stats.tokens == sum(tokens) and stats.tokens <= stats.token_slots
    assert stats.batches == stats.batches_by_fullness + stats.batches_by_timeout + stats.batches_by_close


def test_requests_are_neither_lost_nor_duplicated(tmp_path):
    """Each request's `pooled` output (unique id sum, length) comes back exactly once."""
    path = write_fake(tmp_path, "unpack_repack", batch=2, seq=16, max_valid_num=5, segment_max_size=16)
    results = []
    with runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=500)) as runner:
        futures = []
        for k in range(300):
            n = 1 + k % 16
            ids = np.full(n, 3 + k % 900)
            futures.append((k, runner.execute_async({"input_ids": ids}, {"pooled": np.zeros(2)})))
        for k, future in futures:
            results.append((k, tuple(future.result(timeout=30)["pooled"])))
    assert [tuple(r) for _, r in results] == [((3 + k % 900) * (1 + k % 16), 1 + k % 16) for k in range(300)]


# ------------------------------------------------------------------------------ launching batches


def test_lone_request_launches_after_the_timeout(tmp_path, rng):
    """The order of events, with bounds 10x from the timeout either way: a lone request is still
    waiting a tenth of the timeout after it came, runs no sooner than the timeout, and is done
    within ten timeouts, launched by the timeout."""
    path = write_fake(tmp_path, "attention_mask")
    timeout = 0.3
    with runtime.Runner(path, config_for("attention_mask", timeout_microseconds=int(timeout * 1e6))) as runner:
        runner.execute(make_request(rng, 3))  # warm up
        start = time.monotonic()
        future = runner.execute_async(make_request(rng, 3))
        time.sleep(timeout / 10)
        assert not future.done()
        future.wait(timeout=10 * timeout)
        assert time.monotonic() - start >= timeout
        stats = runner.stats
    assert stats.batches == 2 and stats.batches_by_timeout == 2 and stats.batches_by_fullness == 0


@pytest.mark.parametrize(
    "mode, algorithm, lengths, batches",
    [
        # max_valid_num (4) requests make a batch full
        ("unpack_repack", PackAlgorithm.first_fit, [1, 1, 1, 1], 1),
        # 16 token slots used up
        ("unpack_repack", PackAlgorithm.first_fit, [8, 8], 1),
        # 2 rows x 8: 8 and 8 fill both rows
        ("attention_mask", PackAlgorithm.first_fit, [8, 8], 1),
        ("attention_mask", PackAlgorithm.next_fit, [5, 3, 8], 1),
    ],
)
def test_full_batches_launch_at_once(tmp_path, rng, mode, algorithm, lengths, batches):
    path = write_fake(tmp_path, mode)
    with runtime.Runner(path, config_for(mode, algorithm, timeout_microseconds=60_000_000)) as runner:
        futures = [runner.execute_async(make_request(rng, n)) for n in lengths]
        for f in futures:
            f.wait(timeout=10)  # the timeout is 60 s: only a full batch runs this soon
        stats = runner.stats
    assert stats.batches == stats.batches_by_fullness == batches
    assert stats.packing_efficiency == sum(lengths) / 16


@pytest.mark.parametrize("lookahead", [0, 8])
def test_a_request_that_does_not_fit_launches_the_batch_when_the_model_is_free(tmp_path, rng, lookahead):
    """first_fit in 2 rows of 8: 5, 5 fit (one per row); 5 does not, so the batch goes at once (the
    model is idle: lookahead only applies while a batch runs); the third request waits for its own
    batch, launched on close()."""
    path = write_fake(tmp_path, "attention_mask")
    runner = runtime.Runner(path, config_for("attention_mask", timeout_microseconds=60_000_000, lookahead=lookahead))
    futures = [runner.execute_async(make_request(rng, 5)) for _ in range(3)]
    futures[1].wait(timeout=10)
    assert futures[0].done() and not futures[2].done()
    runner.close()
    futures[2].wait(timeout=1)
    stats = runner.stats
    assert (stats.batches, stats.batches_by_fullness, stats.batches_by_close) == (2, 1, 1)


def record_batches(runner, monkeypatch, requests):
    """Submit `requests` (lengths) while a full blocker batch is held in session.run, so that every
    batch is formed while the model is busy, from a queue holding all of them; return each batch's
    request indices (the blocker's left out)."""
    release, started, batches, index = threading.Event(), threading.Event(), [], {}
    real_run = runner._run

    def run(taken, placements, reason):
        started.set()
        if taken[0].future in index:
            batches.append([index[r.future] for r in taken])
        release.wait(10)
        real_run(taken, placements, reason)

    monkeypatch.setattr(runner, "_run", run)
    rng = np.random.default_rng(0)
    blocker = [runner.execute_async(make_request(rng, runner.seq_len)) for _ in range(runner.batch_size)]
    assert started.wait(10)
    futures = []
    for i, n in enumerate(requests):
        with runner._cond:  # known before the serving thread can take the request
            futures.append(runner.execute_async(make_request(rng, n)))
            index[futures[-1]] = i
    release.set()
    runner.close()
    for f in blocker + futures:
        assert f.exception(timeout=10) is None
    return batches


@pytest.mark.parametrize(
    "lookahead, lengths, batches, overtakes",
    [
        # 6 does not fit beside 5 | 5; the 3s overtake it and fill both rows; 6 heads the next batch
        (1, [5, 5, 6, 3, 3], [[0, 1, 3, 4], [2]], 2),
        # strict arrival order: the batch goes at the first request that does not fit
        (0, [5, 5, 6, 3, 3], [[0, 1], [2, 3, 4]], 0),
        # two requests do not fit (6, 7) with lookahead=1: the batch goes before the 3 is tried
        (1, [5, 5, 6, 7, 3], [[0, 1], [2, 3], [4]], 0),
        # the next batch tries the waiting requests oldest first: 6 and 7 fit, 8 waits again
        (2, [5, 5, 6, 7, 3, 8], [[0, 1, 4], [2, 3], [5]], 1),
    ],
)
def test_lookahead_lets_later_requests_fill_the_open_batch(tmp_path, monkeypatch, lookahead, lengths, batches, overtakes):
    path = write_fake(tmp_path, "attention_mask")
    runner = runtime.Runner(
        path, config_for("attention_mask", timeout_microseconds=60_000_000, lookahead=lookahead)
    )
    assert record_batches(runner, monkeypatch, lengths) == batches
    assert runner.stats.overtakes == overtakes


@pytest.mark.parametrize("mode", ["attention_mask", "unpack_repack"])
@pytest.mark.parametrize("lookahead", [0, 1, 3, 8])
def test_lookahead_bounds_overtaking(tmp_path, monkeypatch, mode, lookahead):
    """Over random lengths: every batch holds the oldest waiting request, passes over at most
    `lookahead` older ones, and lookahead=0 keeps strict arrival order."""
    lengths = np.random.default_rng(lookahead).integers(1, 17, 120).tolist()
    path = write_fake(tmp_path, mode, batch=4, seq=16, max_valid_num=6, segment_max_size=16)
    runner = runtime.Runner(path, config_for(mode, timeout_microseconds=60_000_000, lookahead=lookahead))
    batches = record_batches(runner, monkeypatch, lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    served: set[int] = set()
    for batch in batches:
        waiting = [i for i in range(len(lengths)) if i not in served]
        assert batch[0] == waiting[0]
        passed_over = [i for i in waiting if i < max(batch) and i not in batch]
        assert len(passed_over) <= lookahead
        assert batch == sorted(batch)
        served.update(batch)
    if lookahead == 0:
        assert [i for b in batches for i in b] == list(range(len(lengths)))


def test_max_pending_refuses_requests_beyond_it(tmp_path, rng, monkeypatch):
    path = write_fake(tmp_path, "unpack_repack")  # max_valid_num 4
    runner = runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=60_000_000, max_pending=4))
    started, release = threading.Event(), threading.Event()
    real_run = runner.session.run

    def held_run(names, feeds):
        started.set()
        release.wait(10)
        return real_run(names, feeds)

    monkeypatch.setattr(runner.session, "run", held_run)
    running = [runner.execute_async(make_request(rng, 1)) for _ in range(4)]  # a full batch: taken, not pending
    assert started.wait(10)
    pending = [runner.execute_async(make_request(rng, 2)) for _ in range(4)]
    with pytest.raises(QueueFullError) as info:
        runner.execute_async(make_request(rng, 2))
    assert str(info.value) == (
        "the PackRunner already has 4 requests waiting (max_pending); retry later or raise max_pending"
    )
    release.set()
    runner.close()  # runs the pending batch at once
    for future in running + pending:
        assert future.exception(timeout=10) is None
    assert runner.stats.requests == 8


def test_first_fit_packs_better_than_next_fit(tmp_path, rng):
    lengths = [5, 4, 3, 4]  # first_fit: rows [5,3] [4,4]; next_fit: [5] [4,3] then 4 does not fit
    counts = {}
    for algorithm in (PackAlgorithm.first_fit, PackAlgorithm.next_fit):
        path = write_fake(tmp_path, "attention_mask")
        with runtime.Runner(path, config_for("attention_mask", algorithm, timeout_microseconds=60_000_000)) as runner:
            futures = [runner.execute_async(make_request(rng, n)) for n in lengths]
            futures[1].wait(timeout=10)
        for f in futures:
            assert f.exception() is None
        counts[algorithm] = runner.stats.batches
    assert counts == {PackAlgorithm.first_fit: 1, PackAlgorithm.next_fit: 2}


# --------------------------------------------------------------------------------------- failures


def test_a_failing_batch_fails_only_its_requests(tmp_path, rng, monkeypatch):
    path = write_fake(tmp_path, "unpack_repack")  # max_valid_num 4: every 4 requests make a batch
    with runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=60_000_000)) as runner:
        real_run = runner.session.run

        def run(names, feeds):
            if (feeds["input_ids"] == 999).any():
                raise RuntimeError("device lost\nsecond line")
            return real_run(names, feeds)

        monkeypatch.setattr(runner.session, "run", run)
        groups = []
        for poison in (False, True, False):
            group = []
            for _ in range(4):
                feeds = make_request(rng, 3)
                if poison:
                    feeds["input_ids"][1] = 999
                group.append((runner.execute_async(feeds, out_arrays(runner, 8)), feeds))
            groups.append(group)
        for poison, group in zip((False, True, False), groups, strict=True):
            for future, feeds in group:
                if poison:
                    with pytest.raises(PoprtError) as info:
                        future.wait(timeout=10)
                    assert str(info.value) == (
                        "the batch of 4 requests holding this request failed: RuntimeError: device lost"
                    )
                    assert isinstance(future.exception(), PoprtError)
                else:
                    check_outputs(future.result(timeout=10), feeds)
        # the runner keeps serving
        requests = [make_request(rng, 2) for _ in range(4)]
        futures = [runner.execute_async(feeds, out_arrays(runner, 8)) for feeds in requests]
        for future, feeds in zip(futures, requests, strict=True):
            check_outputs(future.result(timeout=10), feeds)
        stats = runner.stats
    assert (stats.batches, stats.failed_batches, stats.failed_requests) == (4, 1, 4)


def test_close_drains_pending_requests(tmp_path, rng):
    path = write_fake(tmp_path, "attention_mask")
    runner = runtime.Runner(path, config_for("attention_mask", timeout_microseconds=60_000_000))
    requests = [make_request(rng, n) for n in (3, 2)]
    futures = [runner.execute_async(f, out_arrays(runner, 8)) for f in requests]
    runner.close()  # the timeout is 60 s: close() launches the batch
    for future, feeds in zip(futures, requests, strict=True):
        check_outputs(future.result(timeout=0), feeds)
    assert runner.stats.batches_by_close == 1 and runner.stats.batches_by_timeout == 0
    with pytest.raises(PoprtError, match="closed"):
        runner.execute_async(make_request(rng, 3))
    runner.close()  # idempotent


def test_futures_and_listeners_see_the_batch_that_ran_them(tmp_path, rng):
    path = write_fake(tmp_path, "attention_mask")
    runner = runtime.Runner(path, config_for("attention_mask", timeout_microseconds=60_000_000))
    seen = []
    runner.batch_listeners.append(lambda batch: seen.append(batch))
    runner.batch_listeners.append(lambda batch: 1 / 0)  # a broken listener fails nothing
    futures = [runner.execute_async(make_request(rng, n), out_arrays(runner, 8)) for n in (3, 2)]
    assert runner.pending == 2
    runner.close()
    (batch,) = seen
    assert (batch.requests, batch.tokens, batch.token_slots) == (2, 5, 16)
    for future in futures:
        assert future.batch is batch and future.queued <= batch.started <= batch.finished
    assert runner.pending == 0 and runner.stats.failed_requests == 0


def test_close_can_cancel_pending_requests(tmp_path, rng):
    path = write_fake(tmp_path, "unpack_repack")
    runner = runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=60_000_000))
    futures = [runner.execute_async(make_request(rng, 7)) for _ in range(5)]  # 2 full batches + 1
    futures[3].wait(timeout=10)
    runner.close(cancel_pending=True)
    with pytest.raises(PoprtError, match="closed before this request ran"):
        futures[4].result(timeout=0)
    assert all(f.exception() is None for f in futures[:4])


def test_close_while_a_batch_runs_waits_for_it(tmp_path, rng, monkeypatch):
    path = write_fake(tmp_path, "unpack_repack")
    runner = runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=0))
    real_run = runner.session.run
    started, release = threading.Event(), threading.Event()

    def held_run(names, feeds):
        started.set()
        assert release.wait(10)
        return real_run(names, feeds)

    monkeypatch.setattr(runner.session, "run", held_run)
    first = runner.execute_async(make_request(rng, 3))
    assert started.wait(10)
    second = runner.execute_async(make_request(rng, 3))  # queued behind the running batch
    closer = threading.Thread(target=runner.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive() and not first.done()  # close() waits while the batch is held
    release.set()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert first.exception() is None and second.exception() is None
    assert not runner._thread.is_alive()


def test_close_while_clients_submit_leaves_nothing_pending(tmp_path):
    """Every call either raises 'closed' or returns a future that completes; none hangs."""
    path = write_fake(tmp_path, "attention_mask", batch=2, seq=16, max_valid_num=6, segment_max_size=16)
    runner = runtime.Runner(path, config_for("attention_mask", timeout_microseconds=1000))
    futures, refused, lock = [], [0], threading.Lock()

    def client(seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            try:
                future = runner.execute_async(make_request(rng, int(rng.integers(1, 17))))
            except PoprtError as exc:
                assert "closed" in str(exc)
                with lock:
                    refused[0] += 1
                return
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    runner.close()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert all(f.done() and f.exception() is None for f in futures)
    assert runner.stats.requests == len(futures)
    assert refused[0] > 0 or len(futures) == 8 * 300


def test_wait_with_timeout(tmp_path, rng):
    path = write_fake(tmp_path, "attention_mask")
    with runtime.Runner(path, config_for("attention_mask", timeout_microseconds=60_000_000)) as runner:
        future = runner.execute_async(make_request(rng, 2))
        with pytest.raises(FutureTimeout):
            future.wait(timeout=0.01)
    assert future.done() and future.exception() is None


# -------------------------------------------------------------------------------- bad requests


@pytest.fixture(scope="module")
def unpack_runner(tmp_path_factory):
    path = write_fake(tmp_path_factory.mktemp("fake"), "unpack_repack")
    with runtime.Runner(path, config_for("unpack_repack", timeout_microseconds=0)) as runner:
        yield runner


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.update(input_ids=f["input_ids"][:0]), "the request is empty (feed 'input_ids' has 0 tokens)"),
        (
            lambda f: f.update(input_ids=np.ones(9, np.int64)),
            "the request has 9 tokens, more than segment_max_size 8 of the artifact; truncate or split it",
        ),
        (lambda f: f.pop("input_ids"), "missing feed 'input_ids'; a request takes: input_ids, attention_mask (optional), "
         "token_type_ids (optional), position_ids (optional), unpack_info (optional, ignored)"),
        (lambda f: f.update(segment_ids=f["input_ids"]), "unexpected feed 'segment_ids'; a request takes: input_ids, "
         "attention_mask (optional), token_type_ids (optional), position_ids (optional), unpack_info (optional, ignored)"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.float32)),
         "feed 'input_ids' has dtype float32; the model expects int64"),
        (lambda f: f.update(token_type_ids=f["token_type_ids"][:2]), "feed 'token_type_ids' has 2 tokens; 'input_ids' has 3"),
        (lambda f: f.update(input_ids=np.ones((2, 3), np.int64)),
         "feed 'input_ids' has shape [2, 3]; a request's 'input_ids' is [n] or [1, n]"),
        (lambda f: f.update(input_ids=np.array([3, 1000, 4])), "feed 'input_ids' has ids >= the vocabulary size 1000"),
        (lambda f: f.update(position_ids=np.array([0, -1, 2])), "feed 'position_ids' has negative values"),
        (lambda f: f.update(attention_mask=np.array([1, 1, 0])),
         "feed 'attention_mask' has zeros; send each request unpadded (its real tokens only)"),
        (lambda f: f.update(token_type_ids=np.array([0, 1, 2**40])), None),  # fine: model takes int64
    ],
)
def test_bad_requests_fail_on_the_call(unpack_runner, rng, change, message):
    feeds = make_request(rng, 3)
    change(feeds)
    before = unpack_runner.stats.requests
    if message is None:
        unpack_runner.execute(feeds)
        return
    with pytest.raises(RequestError) as info:
        unpack_runner.execute_async(feeds)
    assert str(info.value) == message
    assert "\n" not in message
    time.sleep(0.01)
    assert unpack_runner.stats.requests == before and not unpack_runner._open and not unpack_runner._waiting


def test_out_of_range_ids_for_an_int32_model(tmp_path, rng):
    path = write_fake(tmp_path, "attention_mask", id_dtype=TensorProto.INT32)
    with runtime.Runner(path, config_for("attention_mask", timeout_microseconds=0)) as runner:
        feeds = make_request(rng, 4)  # int64 feeds are cast to the model's int32
        check_outputs(runner.execute(feeds, out_arrays(runner, 8)), feeds)
        feeds["token_type_ids"] = np.array([0, 1, 2**33, 0])
        with pytest.raises(RequestError, match="feed 'token_type_ids' has values outside the range of int32"):
            runner.execute(feeds)


@pytest.mark.parametrize(
    "outputs, message",
    [
        ({"start": np.zeros(8)}, "model has no output 'start'; outputs are: start_logits, end_logits, hidden, pooled"),
        ({"start_logits": np.zeros(2)}, "output array 'start_logits' has shape [2]; it must be [>=3] (e.g. [max_seq_len])"),
        ({"hidden": np.zeros(8)}, "output array 'hidden' has shape [8]; it must be [>=3, 2] (e.g. [max_seq_len, 2])"),
        ({"pooled": np.zeros(8)}, "output array 'pooled' has shape [8]; it must be [2] (one per request)"),
        ({"start_logits": np.zeros(8, np.int32)}, "output array 'start_logits' has dtype int32; the model gives float32"),
        ({"start_logits": [0.0] * 8}, "output 'start_logits' must be a numpy array, got list"),
    ],
)
def test_bad_output_arrays_fail_on_the_call(unpack_runner, rng, outputs, message):
    with pytest.raises(RequestError) as info:
        unpack_runner.execute_async(make_request(rng, 3), outputs)
    assert str(info.value) == message


# ---------------------------------------------------------------------------- config vs manifest


def test_config_defaults_come_from_the_manifest(tmp_path):
    path = write_fake(tmp_path, "attention_mask", batch=3, seq=16, max_valid_num=7, segment_max_size=12)
    with runtime.Runner(path, PackRunnerConfig()) as runner:
        assert (runner.mode, runner.max_valid_num, runner.segment_max_size) == ("attention_mask", 7, 12)
        assert (runner.batch_size, runner.seq_len, runner.dynamic_input_name) == (3, 16, "input_ids")
        assert runner.algorithm is PackAlgorithm.first_fit and runner.timeout_microseconds == 10_000
        assert "mode=attention_mask" in repr(runner)
    config = PackRunnerConfig(timeout_microseconds=5, max_valid_num=7, dynamic_input_name="input_ids", algorithm="next_fit")
    config.enable_input_single_row_mode("attention_mask")
    with runtime.Runner(path, config) as runner:
        assert runner.algorithm is PackAlgorithm.next_fit and runner.timeout_microseconds == 5


@pytest.mark.parametrize(
    "mode, setup, message",
    [
        ("unpack_repack", lambda c: setattr(c, "max_valid_num", 5),
         "max_valid_num=5 contradicts the artifact, compiled with max_valid_num=4; leave it unset or recompile"),
        ("unpack_repack", lambda c: setattr(c, "dynamic_input_name", "token_type_ids"),
         "dynamic_input_name 'token_type_ids' contradicts the artifact, whose dynamic input is 'input_ids'; leave it unset"),
        ("unpack_repack", lambda c: setattr(c, "dynamic_input_name", "ids"),
         "dynamic_input_name 'ids' is not an input of the model; its inputs are: input_ids, attention_mask, "
         "token_type_ids, position_ids, unpack_info"),
        ("unpack_repack", lambda c: c.enable_input_single_row_mode("attention_mask"),
         "enable_input_single_row_mode('attention_mask') asks for AttentionMask mode, but artifact '{path}' was "
         "compiled for unpack_repack mode; drop that call or compile with pack_args mode=attention_mask"),
        ("attention_mask", lambda c: c.enable_input_single_row_mode("input_ids"),
         "enable_input_single_row_mode('input_ids'): the model's attention-mask input is 'attention_mask'"),
        ("attention_mask", lambda c: setattr(c, "algorithm", PackAlgorithm.spfhp),
         "spfhp packs a whole dataset at once; a PackRunner packs online with first_fit or next_fit"),
        ("attention_mask", lambda c: setattr(c, "algorithm", "worst_fit"),
         "unknown packing algorithm 'worst_fit'; choose one of first_fit, next_fit, best_fit_decreasing, spfhp, longest_first"),
        ("attention_mask", lambda c: setattr(c, "timeout_microseconds", -1),
         "timeout_microseconds must be a non-negative number, got -1"),
        ("attention_mask", lambda c: setattr(c, "max_valid_num", 0), "max_valid_num must be a positive integer, got 0"),
        ("unpack_repack", lambda c: setattr(c, "lookahead", -1), "lookahead must be a non-negative integer, got -1"),
        ("unpack_repack", lambda c: setattr(c, "lookahead", 2.5), "lookahead must be a non-negative integer, got 2.5"),
        ("unpack_repack", lambda c: setattr(c, "max_pending", 0), "max_pending must be a positive integer or None, got 0"),
    ],
)
def test_config_contradicting_the_manifest_is_an_error(tmp_path, mode, setup, message):
    path = write_fake(tmp_path, mode)
    config = PackRunnerConfig()
    setup(config)
    with pytest.raises(PoprtError) as info:
        runtime.Runner(path, config)
    assert str(info.value) == message.format(path=path)


def test_unpacked_artifact_is_refused(tmp_path):
    model = build_fake_model("attention_mask", 2, 8, 4, 8)
    del model.metadata_props[:]
    path = artifact.write_artifact(tmp_path / "plain.popef", model, {"source_sha256": "0" * 64, "precision": "fp32", "pipeline": []})
    with pytest.raises(PoprtError, match="is not packed"):
        runtime.Runner(path, PackRunnerConfig())
    assert isinstance(runtime.Runner(path), runtime.ModelRunner)


# ------------------------------------------------------------------- end to end on real exports


class Reference:
    """The original (unconverted) model, run on one request alone."""

    def __init__(self, name):
        self.session = ort.InferenceSession(str(TESTDATA / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds):
        run_feeds = {k: np.asarray(feeds.get(k, np.ones_like(feeds["input_ids"]))).reshape(1, -1).astype(np.int64)
                     for k in self.inputs}
        return dict(zip(self.outputs, self.session.run(None, run_feeds), strict=True))


def compile_packed(tmp_path, name, mode, inputs=("input_ids", "attention_mask", "token_type_ids"), batch=4,
                   seq=64, max_valid_num=8, dynamic_rows=False):
    """A packed artifact; token_stream's batch holds at most batch * seq tokens (no static shape)."""
    pack_args = {"max_valid_num": str(max_valid_num), "segment_max_size": str(seq), "mode": mode}
    if mode == STREAM:
        shape, pack_args["max_tokens"] = {}, str(batch * seq)
    else:
        shape = {n: (batch, seq) for n in inputs}
    options = poprt_lite.CompileOptions(input_shape=shape, pack_args=pack_args, dynamic_rows=dynamic_rows)
    out = tmp_path / f"{name}_{mode}{'_rows' if dynamic_rows else ''}"
    return poprt_lite.compile(TESTDATA / f"{name}.onnx", out / "model.onnx", output_dir=out, export_popef=True,
                              options=options).artifact


def serve_and_check(path, config, reference, clients, per_client, max_len=64, seed=0, with_positions=False):
    errors, worst = [], [0.0]
    with runtime.Runner(path, config) as runner:

        def client(k):
            rng = np.random.default_rng(seed * 1000 + k)
            try:
                pending = []
                for j in range(per_client):
                    n = int(rng.integers(1, max_len + 1))
                    feeds = {"input_ids": rng.integers(3, VOCAB, n).astype(np.int32)}
                    if "token_type_ids" in runner.inputs:
                        feeds["token_type_ids"] = rng.integers(0, 2, n).astype(np.int32)
                    if with_positions:  # as PopRT's example does: explicit, offset included
                        feeds["position_ids"] = np.arange(n, dtype=np.int32) + runner.position_offset
                        feeds["attention_mask"] = np.ones(n, np.int32)
                    outputs = {name: np.zeros((max_len, *out.trailing) if out.layout != "per_request" else out.trailing, np.float32)
                               for name, out in runner.interface.outputs.items()}
                    pending.append((runner.execute_async(feeds, outputs), feeds, outputs))
                for future, feeds, outputs in pending:
                    future.wait(timeout=60)
                    want = reference(feeds)
                    assert set(outputs) == set(want)  # the artifact serves every output of the original
                    n = len(feeds["input_ids"])
                    for name, got in outputs.items():
                        layout = runner.interface.outputs[name].layout
                        ref = want[name][0] if layout == "per_request" else want[name][0, :n]
                        diff = float(np.abs((got if layout == "per_request" else got[:n]) - ref).max())
                        worst[0] = max(worst[0], diff)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        stats = runner.stats
    assert not errors, errors[0]
    assert stats.requests == clients * per_client and stats.failed_requests == 0
    assert worst[0] < 1e-4, worst[0]
    return stats


@pytest.fixture(scope="module")
def bert_artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    return {mode: compile_packed(tmp, "bert_qa_torchscript", mode) for mode in ("unpack_repack", "attention_mask", STREAM)}


@pytest.mark.parametrize("mode, algorithm", REAL_MODES)
def test_bert_qa_end_to_end(bert_artifacts, mode, algorithm, rng):
    config = config_for(mode, algorithm, timeout_microseconds=3000)
    reference = Reference("bert_qa_torchscript")
    serve_and_check(bert_artifacts[mode], config, reference, clients=8, per_client=20, with_positions=mode == "unpack_repack")
    # requests share a batch: 8 (max_valid_num) queued at once make one full batch, each answer its own
    config = config_for(mode, algorithm, timeout_microseconds=60_000_000)
    with runtime.Runner(bert_artifacts[mode], config) as runner:
        requests = [make_request(rng, n) for n in (64, 1, 30, 7, 20, 2, 13, 50)]
        with runner._cond:  # all queued before the serving thread takes a batch
            futures = [runner.execute_async(feeds) for feeds in requests]
        answers = [future.result(timeout=60) for future in futures]
        stats = runner.stats
    # token_stream runs it as two calls: 1..30 tokens, then 50 and 64 (packing.length_groups)
    calls = 2 if mode == STREAM else 1
    assert (stats.batches, stats.batches_by_fullness, stats.requests) == (calls, calls, 8)
    for feeds, got in zip(requests, answers, strict=True):
        want = reference(feeds)
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode, algorithm", REAL_MODES)
def test_bert_qa_32_clients_x_200_requests(bert_artifacts, mode, algorithm):
    config = config_for(mode, algorithm, timeout_microseconds=3000)
    serve_and_check(bert_artifacts[mode], config, Reference("bert_qa_torchscript"), clients=32, per_client=200, seed=1)


@pytest.mark.parametrize("mode", ["attention_mask", STREAM])
def test_roberta_position_offset_is_added(tmp_path, mode):
    """RoBERTa's position ids start at 2 (manifest position_offset); requests omit them."""
    path = compile_packed(tmp_path, "roberta_qa", mode, inputs=("input_ids", "attention_mask"))
    config = config_for(mode, timeout_microseconds=2000)
    serve_and_check(path, config, Reference("roberta_qa"), clients=4, per_client=10)


@pytest.mark.parametrize("mode", ["unpack_repack", STREAM])
def test_bert_meanpool_per_request_output(tmp_path, mode):
    """A pooled vector per request and a [64]-wide token output."""
    path = compile_packed(tmp_path, "bert_meanpool", mode)
    config = config_for(mode, timeout_microseconds=2000)
    serve_and_check(path, config, Reference("bert_meanpool"), clients=4, per_client=10)


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask", STREAM])
@pytest.mark.parametrize("name", ["xlmr_sdpa", "xlmr_sdpa_dynamo"])
def test_xlmr_sdpa_last_hidden_state_per_request(tmp_path, name, mode):
    """XLM-R with sdpa attention; the TorchScript export names its output dims its own way
    (`LayerNormalizationlast_hidden_state_dim_0`), which once made the layout 'global' (issue 12.3)."""
    path = compile_packed(tmp_path, name, mode, inputs=("input_ids", "attention_mask"))
    manifest = artifact.load_artifact(path).manifest
    assert [(o["name"], o["layout"]) for o in manifest["outputs"]] == [("last_hidden_state", {"unpack_repack": "unpacked", "attention_mask": "packed", STREAM: "stream"}[mode])]
    config = config_for(mode, timeout_microseconds=2000)
    serve_and_check(path, config, Reference(name), clients=4, per_client=10)


def test_token_stream_runner_takes_its_geometry_from_the_manifest(bert_artifacts, rng):
    """runtime.Runner(path, PackRunnerConfig(timeout, max_valid_num)): everything else from the
    manifest; a batch is bounded by max_tokens (4 x 64 = 256) and max_valid_num (8), and runs at its
    own length: the model sees [1, T] with T its real tokens."""
    config = PackRunnerConfig(timeout_microseconds=60_000_000, max_valid_num=8)
    with runtime.Runner(bert_artifacts[STREAM], config) as runner:
        assert (runner.mode, runner.batch_size, runner.seq_len, runner.segment_max_size) == (STREAM, 1, 256, 64)
        assert "mode=token_stream" in repr(runner)
        seen = []
        real_run = runner.session.run
        runner.session.run = lambda names, feeds: seen.append((feeds["input_ids"].shape, feeds["unpack_info"].tolist())) or real_run(names, feeds)
        with runner._cond:  # all queued before the serving thread takes a batch
            futures = [runner.execute_async(make_request(rng, n)) for n in (64, 64, 64, 60, 5, *[1] * 8)]
        runner.close()  # the second batch goes on close
        for f in futures:
            f.wait(timeout=30)
        stats = runner.stats
    # 64+64+64+60 = 252: the 5 does not fit, four 1s overtake it (lookahead 8) up to 256 tokens; its
    # attention would pad the 1s to 64, so it runs as two calls of similar lengths, shortest first
    # (packing.length_groups); the next batch takes the 5 first, then the remaining 1s, in one call
    assert seen == [((1, 4), [1, 1, 1, 1]), ((1, 252), [60, 64, 64, 64]), ((1, 9), [1, 1, 1, 1, 5])]
    assert stats.batches == 3 and stats.tokens == stats.token_slots == 265
    with pytest.raises(RequestError, match=r"^the request has 65 tokens, more than segment_max_size 64 of the artifact; truncate or split it$"):
        runtime.Runner(bert_artifacts[STREAM], config).execute(make_request(rng, 65))


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask"])
def test_dynamic_rows_run_the_rows_a_batch_uses(tmp_path, rng, mode):
    """An artifact compiled with --dynamic_rows (up to 4 rows of 64): a PackRunner runs each batch on
    the rows its requests use. One request at a time: every batch goes by timeout, on one row."""
    path = compile_packed(tmp_path, "bert_qa_torchscript", mode, dynamic_rows=True)
    reference = Reference("bert_qa_torchscript")
    with runtime.Runner(path, config_for(mode, timeout_microseconds=1000)) as runner:
        assert runner.interface.dynamic_rows and runner.batch_size == 4
        shapes = []
        real = runner.session.run
        runner.session.run = lambda names, feeds: shapes.append(feeds["input_ids"].shape) or real(names, feeds)
        for n in (1, 64, 30):
            feeds = make_request(rng, n)
            got = runner.execute(feeds)
            for name, want in reference(feeds).items():
                np.testing.assert_allclose(got[name], want[0], atol=1e-4, rtol=0)
        stats = runner.stats
    assert shapes == [(1, 64)] * 3 and stats.batches_by_timeout == 3
    assert stats.token_slots == 3 * 64 and stats.packing_efficiency == 95 / 192
    runner = runtime.Runner(path)  # a ModelRunner takes the rows a batch uses, or all of them, not more
    feeds = {"input_ids": np.full((5, 64), 7), "attention_mask": np.ones((5, 64), np.int64),
             "token_type_ids": np.zeros((5, 64), np.int64), "position_ids": np.tile(np.arange(64), (5, 1))}
    if mode == "unpack_repack":
        feeds["unpack_info"] = np.array([64] * 5 + [0] * 3, np.int32)
    with pytest.raises(RequestError, match=r"^feed 'input_ids' has 5 rows, more than the 4 rows of the artifact \(input_shape\); send at most that many$"):
        runner.run(None, feeds)
    two = {name: value[:2] for name, value in feeds.items() if name != "unpack_info"}
    four = {name: np.concatenate([value[:2], np.zeros_like(value[:2])]) for name, value in two.items()}
    if mode == "unpack_repack":
        two["unpack_info"] = four["unpack_info"] = np.array([64, 64, 0, 0, 0, 0, 0, 0], np.int32)
    for got, want in zip(runner.run(None, two), runner.run(None, four), strict=True):
        np.testing.assert_allclose(got[:2], want[:2], atol=1e-5, rtol=0)  # the requests of rows 0-1


@pytest.mark.parametrize("name, mode", [("deberta_v2_cls", "unpack_repack"), ("deberta_v2_cls", "attention_mask"), ("mpnet_qa", "attention_mask")])
def test_relative_position_encoders_per_request(tmp_path, name, mode):
    """Attention with score terms online (issue 12.2): DeBERTa-v2 (c2p/p2c, no position_ids input,
    per-request logits) and MPNet (relative-position bias on packed rows)."""
    path = compile_packed(tmp_path, name, mode, inputs=("input_ids", "attention_mask"))
    serve_and_check(path, config_for(mode, timeout_microseconds=2000), Reference(name), clients=4, per_client=8)


def test_packed_bert_example_runs(capsys, monkeypatch):
    """examples/packed_bert, small: every mode's MAE against the padded baseline is below 1e-4, and
    every run's every token equals the source model's on that request alone (1e-4)."""
    import importlib.util
    import sys

    from cli.test_poprt_compat import RUN_NAMES, max_error_against_the_source, record_example_runs

    script = TESTDATA.parent / "examples" / "packed_bert" / "packed_bert_example.py"
    spec = importlib.util.spec_from_file_location("packed_bert_example", script)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up
    spec.loader.exec_module(example)
    datasets, runs = record_example_runs(example, monkeypatch)
    args = ["--batch_size", "4", "--max_seq_len", "64", "--avg_seq_len", "32", "--max_valid_num", "12",
            "--iterations", "10", "--latency_requests", "5", "--timeout_microseconds", "1000"]
    assert example.main(args) == 0
    out = capsys.readouterr().out
    for mode in ("[Original (padded)]", "[Pack Offline Unpack Repack]", "[Pack Online Unpack Repack]",
                 "[Pack Offline AttentionMask]", "[Pack Online AttentionMask(first_fit)]",
                 "[Pack Online AttentionMask(next_fit)]", "P99 latency"):
        assert mode in out
    assert "(below 0.0001)" in out
    assert sorted(runs) == sorted(RUN_NAMES) and len(datasets) == 10 * 4
    assert max_error_against_the_source(datasets, runs) < 1e-4


def test_close_cancel_pending_starts_no_further_length_group_call(bert_artifacts, rng, monkeypatch):
    """A taken token_stream batch runs as length-group calls; close(cancel_pending=True) while the
    first runs fails the requests of the calls not yet started, and no model call starts after it."""
    config = config_for(STREAM, timeout_microseconds=60_000_000)
    runner = runtime.Runner(bert_artifacts[STREAM], config)
    real_run = runner.session.run
    started, release, calls = threading.Event(), threading.Event(), []

    def held_run(names, feeds):
        calls.append(feeds["unpack_info"].tolist())
        started.set()
        assert release.wait(10)
        return real_run(names, feeds)

    monkeypatch.setattr(runner.session, "run", held_run)
    with runner._cond:  # one batch of 8 (max_valid_num): calls of 1..30 tokens, then 50 and 64
        futures = [runner.execute_async(make_request(rng, n)) for n in (64, 1, 30, 7, 20, 2, 13, 50)]
    assert started.wait(10)
    closer = threading.Thread(target=runner.close, kwargs={"cancel_pending": True})
    closer.start()
    closer.join(timeout=0.2)
    release.set()
    closer.join(timeout=10)
    assert not closer.is_alive() and calls == [[1, 2, 7, 13, 20, 30]]
    for n, future in zip((64, 1, 30, 7, 20, 2, 13, 50), futures, strict=True):
        if n >= 50:
            with pytest.raises(PoprtError, match=r"^the PackRunner was closed before this request ran$"):
                future.result(timeout=0)
        else:
            assert future.exception(timeout=0) is None


@pytest.mark.parametrize("race", [False, True], ids=["cancel", "taken-while-cancelled"])
@pytest.mark.parametrize("mode, algorithm", REAL_MODES)
def test_a_cancelled_request_leaves_its_batch(bert_artifacts, mode, algorithm, race, rng):
    """future.cancel() withdraws a request whose batch has not started, from the queue or from the
    open batch, which is laid out again and takes a waiting request in its place. A batch taken
    between a future's cancellation and its withdrawal runs without it, the others closed up in
    their rows (`race`: the withdrawal never comes). The others' answers equal the original model's
    on each alone; cancel() on an answered request returns False."""
    lengths = (30, 20, 10, 40, 25, 5, 60, 15, 12, 7, 33, 3)  # 8 fill a batch (max_valid_num); 4 wait
    withdrawn = {0, 3} if race else {0, 3, 9}  # the first of rows 0 and 1 in AttentionMask mode; one waiting
    reference = Reference("bert_qa_torchscript")
    runner = runtime.Runner(bert_artifacts[mode], config_for(mode, algorithm, timeout_microseconds=60_000_000))
    sizes = []
    runner.batch_listeners.append(lambda batch: sizes.append(batch.requests))
    requests = [make_request(rng, n) for n in lengths]
    with runner._cond:  # all queued and withdrawn before the serving thread takes a batch
        futures = [runner.execute_async(feeds) for feeds in requests]
        cancel = concurrent.futures.Future.cancel if race else PackFuture.cancel
        assert all(cancel(futures[i]) for i in withdrawn)
        assert runner.pending == len(lengths) - len(withdrawn)
    runner.close()  # the second batch goes on close
    stats = runner.stats
    kept = [i for i in range(len(lengths)) if i not in withdrawn]
    assert (stats.cancelled_requests, stats.requests, stats.failed_requests) == (0 if race else 3, len(kept), 0)
    assert stats.tokens == sum(lengths[i] for i in kept)
    if mode != STREAM:  # token_stream runs a batch as its length groups
        assert sizes == ([6, 4] if race else [8, 1])  # withdrawn in time, their places went to waiting ones
    for i in withdrawn:
        assert futures[i].cancelled()
    for i in kept:
        got, want = futures[i].result(timeout=0), reference(requests[i])
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value[0], atol=1e-4, rtol=0)
        assert not futures[i].cancel()
