"""Bad requests to every runner: one line of RequestError on that call only, nothing queued, and
the runner keeps serving (a good request after the bad one gets the original model's answer).

Runners: `runtime.Runner(artifact)` (a ModelRunner on a padded artifact), `get_session(...).load()`
on a converted model with dynamic shapes and on unpack/repack and token_stream artifacts (PopRT's
offline packing: the caller sends packed batches and `unpack_info`), and the PackRunner in every mode
through `execute` and `execute_async`. The model is testdata/bert_qa_torchscript.onnx; a tiny hand-built
packed model with a float per-token input covers NaN / infinity.

For the PackRunner every bad call sits between two good requests, A (queued before) and B (after):
both must come back right, and the runner must have run exactly A and B, so the bad request was
neither queued nor able to fail the batch it would have shared with A.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import VOCAB, model_path
from poprt_lite import compile, ir, runtime
from poprt_lite.ir import artifact
from poprt_lite.compat.backend import get_session
from poprt_lite.compiler import CompileOptions, servable
from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.vocab import PackMode

BERT = model_path("bert_qa_torchscript")
B, S, N = 2, 16, 4  # batch rows, row length (= segment_max_size), max_valid_num
OUTPUTS = ("start_logits", "end_logits")
PADDED_INPUTS = "input_ids, attention_mask, token_type_ids, position_ids"
STREAM = PackMode.token_stream.value
TAKES = {
    "unpack_repack": "input_ids, attention_mask (optional), token_type_ids (optional), position_ids (optional), "
    "unpack_info (optional, ignored)",
    "attention_mask": "input_ids, attention_mask (optional), token_type_ids (optional), position_ids (optional)",
}
TAKES[STREAM] = TAKES["unpack_repack"]


# ----------------------------------------------------------------------------------------- models


def _compile(out: Path, mode: str | None, static: bool = True) -> Path:
    pack_args = {"max_valid_num": str(N), "segment_max_size": str(S), "mode": mode} if mode else None
    if mode == STREAM:
        pack_args["max_tokens"] = str(B * S)
    options = CompileOptions(
        export_position_ids=True,
        input_shape={n: (B, S) for n in ("input_ids", "attention_mask", "token_type_ids")} if static and mode != STREAM else {},
        pack_args=pack_args,
    )
    result = compile(BERT, out / "model.onnx", output_dir=out, export_popef=static, options=options)
    return result.artifact if static else result.output_model


def float_model() -> onnx.ModelProto:
    """An AttentionMask-mode packed model with a float per-token input `features` [B, S, 2]:
    start_logits = id + sum(features); end_logits = sum of the token's request's feature sums
    (a masked MatMul across the row, as attention is, so a NaN would reach the row's other requests)."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, [B, S, 2]),
    ]
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value), name))

    nodes = [
        const("ax1", np.array([1])), const("ax2", np.array([2])), const("zero", np.array(0)),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["features", "ax2"], ["fsum"], keepdims=0),
        helper.make_node("Add", ["ids_f", "fsum"], ["start_logits"]),
        helper.make_node("Unsqueeze", ["attention_mask", "ax2"], ["seg_i"]),
        helper.make_node("Unsqueeze", ["attention_mask", "ax1"], ["seg_j"]),
        helper.make_node("Equal", ["seg_i", "seg_j"], ["same"]),
        helper.make_node("Greater", ["seg_j", "zero"], ["real"]),
        helper.make_node("And", ["same", "real"], ["visible"]),
        helper.make_node("Cast", ["visible"], ["visible_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["fsum", "ax2"], ["fcol"]),
        helper.make_node("MatMul", ["visible_f", "fcol"], ["end3"]),
        helper.make_node("Squeeze", ["end3", "ax2"], ["end_logits"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S]) for n in OUTPUTS]
    model = helper.make_model(helper.make_graph(nodes, "float_features", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    ir.set_metadata(model, "pack", json.dumps({"mode": "attention_mask", "max_valid_num": N, "segment_max_size": S}))
    ir.set_metadata(model, "attention_masks", "{}")  # no attention: no mask term to account for
    ir.set_metadata(model, "vocab_size", str(VOCAB))
    for name in OUTPUTS:
        ir.set_metadata(model, f"layout.{name}", "packed")
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad_requests")
    paths = {mode or "padded": _compile(tmp / (mode or "padded"), mode) for mode in (None, "unpack_repack", "attention_mask", STREAM)}
    paths["dynamic"] = _compile(tmp / "dynamic", None, static=False)
    model = float_model()
    onnx.save_model(model, tmp / "float.onnx")
    paths["float_onnx"] = tmp / "float.onnx"
    paths["float"] = artifact.write_artifact(tmp / "float.popef", model, {"source_sha256": "0" * 64, "precision": "fp32", "pipeline": []})
    return paths


class Reference:
    """The original model, run on each request alone ([1, n]: no padding, so exact)."""

    def __init__(self) -> None:
        self.session = ort.InferenceSession(str(BERT), providers=["CPUExecutionProvider"])

    def __call__(self, ids, types) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.asarray(types, np.int64).reshape(1, -1)}
        return {name: out[0] for name, out in zip(OUTPUTS, self.session.run(list(OUTPUTS), feeds), strict=True)}


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def good_request(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(3, VOCAB, n), "token_type_ids": rng.integers(0, 2, n)}


def assert_refused(call, message: str) -> None:
    with pytest.raises(RequestError) as info:
        call()
    assert str(info.value) == message
    assert "\n" not in message


# ------------------------------------------------------------------------ ModelRunner: padded batch


def padded_feeds(rng, lengths=(5, S)):
    feeds = {n: np.zeros((B, S), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
    for row, n in enumerate(lengths):
        request = good_request(rng, n)
        feeds["input_ids"][row, :n] = request["input_ids"]
        feeds["token_type_ids"][row, :n] = request["token_type_ids"]
        feeds["attention_mask"][row, :n] = 1
        feeds["position_ids"][row, :n] = np.arange(n)
    return feeds


def check_padded(runner, rng, reference, lengths=(5, S)):
    feeds = padded_feeds(rng, lengths)
    for name, got in zip(OUTPUTS, runner.run(list(OUTPUTS), feeds), strict=True):
        for row, n in enumerate(lengths):
            want = reference(feeds["input_ids"][row, :n], feeds["token_type_ids"][row, :n])[name]
            np.testing.assert_allclose(got[row, :n], want, atol=1e-4, rtol=0)


def _set(name, value):
    def change(feeds):
        feeds[name] = value(feeds[name]) if callable(value) else value
    return change


def _poke(name, value, at=(0, 1)):
    def change(feeds):
        feeds[name] = feeds[name].copy()
        feeds[name][at] = value
    return change


PADDED_CASES = {
    "missing": (lambda f: f.pop("position_ids"), f"missing feed 'position_ids'; the model takes: {PADDED_INPUTS}"),
    "extra": (_set("segment_ids", np.zeros((B, S), np.int64)), f"unexpected feed 'segment_ids'; the model takes: {PADDED_INPUTS}"),
    "float-ids": (_set("input_ids", lambda a: a.astype(np.float32)), "feed 'input_ids' has dtype float32; the model expects int64"),
    "rank-1": (_set("input_ids", lambda a: a[0]), f"feed 'input_ids' has shape [{S}]; the model expects [{B},{S}]"),
    "rank-3": (_set("input_ids", lambda a: a[None]), f"feed 'input_ids' has shape [1, {B}, {S}]; the model expects [{B},{S}]"),
    "empty": (_set("input_ids", lambda a: a[:, :0]), f"feed 'input_ids' has shape [{B}, 0]; the model expects [{B},{S}]"),
    "too-long": (_set("input_ids", lambda a: np.ones((B, S + 1), np.int64)),
                 f"feed 'input_ids' has shape [{B}, {S + 1}]; the model expects [{B},{S}]"),
    "id-past-vocab": (_poke("input_ids", VOCAB), f"feed 'input_ids' has ids >= the vocabulary size {VOCAB}"),
    "negative-id": (_poke("input_ids", -1), "feed 'input_ids' has negative values"),
    "negative-id-int32": (_set("input_ids", lambda a: np.where(a == 0, -5, a).astype(np.int32)), "feed 'input_ids' has negative values"),
    "negative-token-type": (_poke("token_type_ids", -1), "feed 'token_type_ids' has negative values"),
    "negative-position": (_poke("position_ids", -1), "feed 'position_ids' has negative values"),
    "ragged": (_set("input_ids", [[1, 2], [3]]), "feed 'input_ids' is a ragged or non-numeric sequence; pass a numpy array"),
    "id-overflow": (_set("input_ids", lambda a: a.astype(np.uint64) + 2**63), "feed 'input_ids' has values outside the range of int64"),
}


@pytest.mark.parametrize("case", PADDED_CASES)
def test_model_runner(built, rng, reference, case):
    runner = runtime.Runner(built["padded"])
    change, message = PADDED_CASES[case]
    feeds = padded_feeds(rng)
    change(feeds)
    assert_refused(lambda: runner.run(list(OUTPUTS), feeds), message)
    check_padded(runner, rng, reference)


def test_model_runner_requests_and_outputs(built, rng, reference):
    runner = runtime.Runner(built["padded"])
    feeds = padded_feeds(rng)
    assert_refused(lambda: runner.run(None, [feeds]), "feeds must be a dict of input name -> array, got list")
    assert_refused(lambda: runner.run(["logits"], feeds), "model has no output 'logits'; outputs are: start_logits, end_logits")
    assert_refused(lambda: runner.execute(feeds, {"start_logits": np.zeros(S, np.float32)}),
                   f"output array 'start_logits' has shape [{S}]; the model gives [{B}, {S}]")
    outputs = {"start_logits": np.full((B, S), np.nan, np.float32)}  # NaN in the caller's array is overwritten
    runner.execute(feeds, outputs)
    np.testing.assert_array_equal(outputs["start_logits"], runner.run(["start_logits"], feeds)[0])
    check_padded(runner, rng, reference)


# ------------------------------------------------------------- get_session: dynamic shapes, offline packing


DYNAMIC_CASES = {
    "empty": ([1, 0], None, "feed 'input_ids' is empty (shape [1, 0])"),
    "rank-1": ([3], None, "feed 'input_ids' has shape [3]; the model expects [?,?]"),
    "id-past-vocab": ([1, 4], ((0, 2), VOCAB + 5), f"feed 'input_ids' has ids >= the vocabulary size {VOCAB}"),
    "negative-id": ([1, 4], ((0, 0), -2), "feed 'input_ids' has negative values"),
}


@pytest.mark.parametrize("case", DYNAMIC_CASES)
def test_get_session_dynamic_shapes(built, rng, reference, case):
    session = get_session(built["dynamic"], 1, "poprt").load()
    shape, poke, message = DYNAMIC_CASES[case]
    ids = rng.integers(3, VOCAB, shape)
    if poke:
        ids[poke[0]] = poke[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "position_ids": np.broadcast_to(np.arange(shape[-1]), ids.shape)}
    assert_refused(lambda: session.run(None, feeds), message)
    request = good_request(rng, 7)
    ids, types = request["input_ids"][None], request["token_type_ids"][None]
    got = session.run(list(OUTPUTS), {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": types,
                                      "position_ids": np.arange(7)[None]})
    for name, out in zip(OUTPUTS, got, strict=True):
        np.testing.assert_allclose(out[0], reference(ids, types)[name], atol=1e-4, rtol=0)


def packed_batch(rng, lengths=(5, 9)):
    """Two requests one after another in the flat [B*S] stream, as pack_data lays them out."""
    flat = {n: np.zeros(B * S, np.int64) for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
    requests, start = [], 0
    for n in lengths:
        request = good_request(rng, n)
        requests.append(request)
        flat["input_ids"][start:start + n] = request["input_ids"]
        flat["token_type_ids"][start:start + n] = request["token_type_ids"]
        flat["attention_mask"][start:start + n] = 1
        flat["position_ids"][start:start + n] = np.arange(n)
        start += n
    feeds = {name: value.reshape(B, S) for name, value in flat.items()}
    feeds["unpack_info"] = np.zeros(N, np.int32)
    feeds["unpack_info"][: len(lengths)] = lengths
    return feeds, requests


PACKED_CASES = {
    "too-long": (_poke("unpack_info", S + 1, 0), f"feed 'unpack_info' holds a request of {S + 1} tokens (unpack_info[0]), "
                 f"more than segment_max_size {S} of the artifact; truncate or split it"),
    "negative-length": (_poke("unpack_info", -3, 2), "feed 'unpack_info' has negative values"),
    "over-the-batch": (_set("unpack_info", np.array([S, S, S, 1], np.int32)),
                       f"feed 'unpack_info' holds {3 * S + 1} tokens, more than the {B * S} token slots of the batch ({B}x{S})"),
    "float-lengths": (_set("unpack_info", lambda a: a.astype(np.float32)), "feed 'unpack_info' has dtype float32; the model expects int32"),
    "missing-unpack-info": (lambda f: f.pop("unpack_info"), f"missing feed 'unpack_info'; the model takes: {PADDED_INPUTS}, unpack_info"),
    "id-past-vocab": (_poke("input_ids", VOCAB, (1, 3)), f"feed 'input_ids' has ids >= the vocabulary size {VOCAB}"),
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_get_session_offline_packing(built, rng, reference, case):
    session = get_session(built["unpack_repack"], 1, "poprt").load()
    change, message = PACKED_CASES[case]
    feeds, _ = packed_batch(rng)
    change(feeds)
    assert_refused(lambda: session.run(None, feeds), message)
    feeds, requests = packed_batch(rng)
    got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds), strict=True))
    for i, request in enumerate(requests):
        want = reference(request["input_ids"], request["token_type_ids"])
        n = len(request["input_ids"])
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name][i, :n], want[name], atol=1e-4, rtol=0)


def stream_batch(rng, lengths=(5, 9)):
    """Two requests one after another in one [1, T] stream, as pack_data lays them out for token_stream."""
    requests = [good_request(rng, n) for n in lengths]
    feeds = {
        "input_ids": np.concatenate([r["input_ids"] for r in requests])[None],
        "token_type_ids": np.concatenate([r["token_type_ids"] for r in requests])[None],
        "position_ids": np.concatenate([np.arange(n) for n in lengths])[None],
        "unpack_info": np.asarray(lengths, np.int32),
    }
    feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
    return feeds, requests


STREAM_CASES = {
    "too-long": (_poke("unpack_info", S + 1, 0), f"feed 'unpack_info' holds a request of {S + 1} tokens (unpack_info[0]), "
                 f"more than segment_max_size {S} of the artifact; truncate or split it"),
    "negative-length": (_poke("unpack_info", -3, 1), "feed 'unpack_info' has negative values"),
    "over-the-stream": (_set("unpack_info", np.array([5, 10], np.int32)),
                        "feed 'unpack_info' holds 15 tokens, more than the 14 token slots of the batch (1x14)"),
    "too-many-requests": (_set("unpack_info", np.ones(N + 1, np.int32)),
                          f"feed 'unpack_info' holds {N + 1} requests, more than max_valid_num {N} of the artifact; send fewer per batch"),
    "rows-not-a-stream": (_set("input_ids", lambda a: a.reshape(2, 7)), "feed 'input_ids' has shape [2, 7]; the model expects [1,?]"),
    "empty-stream": (lambda f: f.update({k: v[:, :0] for k, v in f.items() if k != "unpack_info"}), "feed 'input_ids' is empty (shape [1, 0])"),
}


@pytest.mark.parametrize("case", STREAM_CASES)
def test_get_session_token_stream(built, rng, reference, case):
    session = get_session(built[STREAM], 1, "poprt").load()
    change, message = STREAM_CASES[case]
    feeds, _ = stream_batch(rng)
    change(feeds)
    assert_refused(lambda: session.run(None, feeds), message)
    feeds, requests = stream_batch(rng, (3, S, 1))
    got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds), strict=True))
    start = 0
    for request in requests:
        want = reference(request["input_ids"], request["token_type_ids"])
        n = len(request["input_ids"])
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name][0, start : start + n], want[name], atol=1e-4, rtol=0)
        start += n


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_get_session_float_input(built, rng, value):
    session = get_session(built["float_onnx"], 1, "poprt").load()
    feeds = {"input_ids": rng.integers(3, VOCAB, (B, S)), "attention_mask": np.ones((B, S), np.int64),
             "features": rng.standard_normal((B, S, 2)).astype(np.float32)}
    bad = {**feeds, "features": feeds["features"].copy()}
    bad["features"][1, 3, 0] = value
    assert_refused(lambda: session.run(None, bad), "feed 'features' has NaN or infinite values")
    start, _ = session.run(None, feeds)
    np.testing.assert_allclose(start, feeds["input_ids"] + feeds["features"].sum(-1), rtol=1e-6)


# ------------------------------------------------------------------------------------- PackRunner


def pack_config(mode: str) -> runtime.PackRunnerConfig:
    # Short enough that the good requests do not wait long, long enough that A usually waits for B.
    config = runtime.PackRunnerConfig(timeout_microseconds=20_000)
    if mode == "attention_mask":
        config.enable_input_single_row_mode("attention_mask")
    return config


@pytest.fixture(scope="module")
def pack_runners(built):
    runners = {mode: runtime.Runner(built[mode], pack_config(mode)) for mode in TAKES}
    runners["float"] = runtime.Runner(built["float"], pack_config("attention_mask"))
    yield runners
    for runner in runners.values():
        runner.close()


def nan_outputs(n_max: int = S) -> dict[str, np.ndarray]:
    return {name: np.full(n_max, np.nan, np.float32) for name in OUTPUTS}


def submit(runner, how: str, feeds, outputs):
    """The bad call, through `execute` or `execute_async`."""
    if how == "execute":
        return runner.execute(feeds, outputs)
    return runner.execute_async(feeds, outputs)


def around_a_bad_call(runner, rng, how, bad_call, check, make=good_request):
    """Good request A (queued), the bad call (must raise on the call), good request B; A and B come
    back right (`check`), and the runner ran exactly those two."""
    before = runner.stats.requests
    a = make(rng, 5)
    a_out = nan_outputs()
    future = runner.execute_async(a, a_out)
    bad_call()
    b = make(rng, 7)
    b_out = nan_outputs()
    if how == "execute":
        runner.execute(b, b_out)
    else:
        runner.execute_async(b, b_out).wait(timeout=30)
    future.wait(timeout=30)
    for request, outputs in ((a, a_out), (b, b_out)):
        n = len(request["input_ids"])
        check(request, outputs, n)
        for name in OUTPUTS:  # the caller's NaNs past the request are left alone
            assert np.isnan(outputs[name][n:]).all()
    deadline = time.monotonic() + 5
    while runner.stats.requests < before + 2 and time.monotonic() < deadline:
        time.sleep(0.001)  # the counters are updated just after the futures complete
    assert runner.stats.requests == before + 2
    assert not runner._open and not runner._waiting


def bert_check(reference):
    def check(request, outputs, n):
        want = reference(request["input_ids"], request["token_type_ids"])
        for name in OUTPUTS:
            np.testing.assert_allclose(outputs[name][:n], want[name], atol=1e-4, rtol=0)
    return check


def _bad_outputs(**arrays):
    return lambda feeds, outputs: (feeds, arrays)


def _feeds(change):
    def make(feeds, outputs):
        change(feeds)
        return feeds, outputs
    return make


def _read_only():
    array = np.zeros(S, np.float32)
    array.flags.writeable = False
    return array


PACK_CASES = {
    "missing": (_feeds(lambda f: f.pop("input_ids")), "missing feed 'input_ids'; a request takes: {takes}"),
    "extra": (_feeds(_set("segment_ids", np.zeros(5, np.int64))), "unexpected feed 'segment_ids'; a request takes: {takes}"),
    "not-a-dict": (lambda f, o: (list(f.values()), o), "feeds must be a dict of input name -> array, got list"),
    "float-ids": (_feeds(_set("input_ids", lambda a: a.astype(np.float32))), "feed 'input_ids' has dtype float32; the model expects int64"),
    "string-ids": (_feeds(_set("input_ids", np.array(list("12345")))), "feed 'input_ids' has dtype str32; the model expects int64"),
    "rank-2": (_feeds(_set("input_ids", lambda a: np.stack([a, a]))),
               "feed 'input_ids' has shape [2, 5]; a request's 'input_ids' is [n] or [1, n]"),
    "rank-0": (_feeds(_set("input_ids", np.int64(5))), "feed 'input_ids' has shape []; a request's 'input_ids' is [n] or [1, n]"),
    "ragged": (_feeds(_set("input_ids", [[1, 2], [3]])), "feed 'input_ids' is a ragged or non-numeric sequence; pass a numpy array"),
    "token-count-mismatch": (_feeds(_set("token_type_ids", lambda a: a[:4])), "feed 'token_type_ids' has 4 tokens; 'input_ids' has 5"),
    "empty": (_feeds(_set("input_ids", lambda a: a[:0])), "the request is empty (feed 'input_ids' has 0 tokens)"),
    "empty-2d": (_feeds(_set("input_ids", np.zeros((1, 0), np.int64))), "the request is empty (feed 'input_ids' has 0 tokens)"),
    "too-long": (_feeds(_set("input_ids", np.full(S + 1, 7))),
                 f"the request has {S + 1} tokens, more than segment_max_size {S} of the artifact; truncate or split it"),
    "id-past-vocab": (_feeds(_poke("input_ids", VOCAB, 2)), f"feed 'input_ids' has ids >= the vocabulary size {VOCAB}"),
    "negative-id": (_feeds(_poke("input_ids", -1, 2)), "feed 'input_ids' has negative values"),
    "negative-id-int32": (_feeds(_set("input_ids", lambda a: -a.astype(np.int32))), "feed 'input_ids' has negative values"),
    # out of their embedding tables (2 token types, 512 positions): onnxruntime would fail the whole batch
    "token-type-past-table": (_feeds(_poke("token_type_ids", 2, 0)),
                              "feed 'token_type_ids' has ids >= 2, the number of rows of the embedding table it indexes"),
    "position-past-table": (_feeds(_set("position_ids", np.array([0, 1, 2, 3, 512]))),
                            "feed 'position_ids' has ids >= 512, the number of rows of the embedding table it indexes"),
    "negative-position": (_feeds(_set("position_ids", np.array([0, 1, -2, 3, 4]))), "feed 'position_ids' has negative values"),
    "padded-mask": (_feeds(_set("attention_mask", np.array([1, 1, 1, 0, 0]))),
                    "feed 'attention_mask' has zeros; send each request unpadded (its real tokens only)"),
    "nan-mask": (_feeds(_set("attention_mask", np.array([1.0, 1.0, np.nan, 1.0, 1.0]))), "feed 'attention_mask' has NaN or infinite values"),
    "string-mask": (_feeds(_set("attention_mask", np.array(["1"] * 5))), "feed 'attention_mask' has dtype str32; the model expects int64"),
    "outputs-too-short": (_bad_outputs(start_logits=np.zeros(4, np.float32)),
                          "output array 'start_logits' has shape [4]; it must be [>=5] (e.g. [max_seq_len])"),
    "outputs-wrong-rank": (_bad_outputs(start_logits=np.zeros((1, S), np.float32)),
                           f"output array 'start_logits' has shape [1, {S}]; it must be [>=5] (e.g. [max_seq_len])"),
    "outputs-wrong-dtype": (_bad_outputs(end_logits=np.zeros(S, np.int32)),
                            "output array 'end_logits' has dtype int32; the model gives float32"),
    "outputs-unknown-name": (_bad_outputs(logits=np.zeros(S, np.float32)),
                             "model has no output 'logits'; outputs are: start_logits, end_logits"),
    "outputs-read-only": (_bad_outputs(start_logits=_read_only()), "output array 'start_logits' is read-only"),
    "outputs-a-list": (_bad_outputs(start_logits=[0.0] * S), "output 'start_logits' must be a numpy array, got list"),
    "outputs-not-a-dict": (lambda f, o: (f, [np.zeros(S, np.float32)]), "outputs must be a dict of output name -> array, got list"),
}
PACK_ONLY = {"unpack_repack": {"unpack-info-2d": (_feeds(_set("unpack_info", np.zeros((2, 2), np.int32))),
                                                  "feed 'unpack_info' must be a 1-D integer array (it is ignored: the runner fills it)")}}
PACK_ONLY[STREAM] = PACK_ONLY["unpack_repack"]


@pytest.mark.parametrize("how", ["execute", "execute_async"])
@pytest.mark.parametrize(
    "mode, case", [(mode, case) for mode in TAKES for case in {**PACK_CASES, **PACK_ONLY.get(mode, {})}]
)
def test_pack_runner(pack_runners, rng, reference, mode, how, case):
    make, message = {**PACK_CASES, **PACK_ONLY.get(mode, {})}[case]
    runner = pack_runners[mode]
    feeds, outputs = make({**good_request(rng, 5), "attention_mask": np.ones(5, np.int64)}, nan_outputs())
    around_a_bad_call(runner, rng, how, lambda: assert_refused(lambda: submit(runner, how, feeds, outputs),
                                                                message.format(takes=TAKES[mode])), bert_check(reference))


@pytest.mark.parametrize("how", ["execute", "execute_async"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_pack_runner_float_input(pack_runners, rng, how, value):
    runner = pack_runners["float"]

    def request(n, rng=rng):
        return {"input_ids": rng.integers(3, VOCAB, n), "features": rng.standard_normal((n, 2))}

    def bad_call():
        feeds = request(5)
        feeds["features"][3, 1] = value
        assert_refused(lambda: submit(runner, how, feeds, nan_outputs()), "feed 'features' has NaN or infinite values")
        big = request(5)  # float64 beyond float32's range becomes infinite when cast for the model
        big["features"][0, 0] = 1e300
        assert_refused(lambda: submit(runner, how, big, nan_outputs()), "feed 'features' has NaN or infinite values")

    def check(feeds, outputs, n):
        features = feeds["features"].astype(np.float32)
        np.testing.assert_allclose(outputs["start_logits"][:n], feeds["input_ids"] + features.sum(1), rtol=1e-6)
        np.testing.assert_allclose(outputs["end_logits"][:n], np.full(n, features.sum()), rtol=1e-5, atol=1e-5)

    around_a_bad_call(runner, rng, how, bad_call, check, make=lambda rng, n: request(n, rng))


def test_nan_would_reach_the_other_requests_of_its_batch(built, rng):
    """Why NaN is refused: the masked MatMul (as attention does) multiplies the other request's
    tokens by weight 0, and 0 * NaN is NaN. Two requests in one row, NaN in the first."""
    session = ort.InferenceSession(artifact.load_artifact(built["float"]).model_bytes, providers=["CPUExecutionProvider"])
    mask = np.zeros((B, S), np.int64)
    mask[0, :4], mask[0, 4:9] = 1, 2
    features = np.zeros((B, S, 2), np.float32)
    features[0, 1, 0] = np.nan
    _, end = session.run(None, {"input_ids": np.ones((B, S), np.int64), "attention_mask": mask, "features": features})
    assert np.isnan(end[0, 4:9]).all()  # the second request's answer is poisoned


def test_position_table_too_small_for_the_requests_is_refused_at_creation(tmp_path):
    """Requests of up to segment_max_size tokens get positions offset .. offset+n-1 by default; a
    position table shorter than that is an error when the runner is created, not per batch (and
    writing such an artifact is refused; one written anyway, e.g. by an older version, is refused by
    the runner)."""
    model = float_model()
    model.graph.input.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S]))
    table = onnx.numpy_helper.from_array(np.zeros((S - 1, 2), np.float32), "pos_table")
    model.graph.initializer.append(table)
    model.graph.node.append(helper.make_node("Gather", ["pos_table", "position_ids"], ["pos_emb"]))
    model.graph.output.append(helper.make_tensor_value_info("pos_emb", TensorProto.FLOAT, [B, S, 2]))
    ir.set_metadata(model, "layout.pos_emb", "packed")
    fields = {"source_sha256": "0" * 64, "precision": "fp32", "pipeline": []}
    with pytest.raises(PoprtError, match=r"^the converted model could not be served by a packed runner: artifact '<converted model>': requests of up to"):
        servable.export_artifact(tmp_path / "short.popef", model, fields)
    assert not list(tmp_path.iterdir())
    path = artifact.write_artifact(tmp_path / "short.popef", model, fields)  # the format alone checks nothing more
    with pytest.raises(PoprtError) as info:
        runtime.Runner(path, pack_config("attention_mask"))
    assert str(info.value) == (
        f"artifact '{path}': requests of up to {S} tokens need position ids up to {S - 1}, but 'position_ids' "
        f"indexes a table of {S - 1} rows; recompile with a smaller segment_max_size"
    )
