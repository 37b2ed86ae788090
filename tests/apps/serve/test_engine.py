"""The engine under the HTTP front: the three batchers give the original model's answers, and a
sequence classifier (a config.json beside its tokenizer) serves /predict and /rerank."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from apps.serve.server import EMBED_MODEL, TESTDATA, TOKENIZER, cosine, original, reference_embedding, tokenizer


from poprt_lite.apps.serve import Engine, Head, create_app

TEXTS = ["hello world", "x", "a text long enough to be cut at twenty four tokens for sure", "mid length text"]
PACK_ARGS = {"mode": "token_stream", "max_valid_num": "8", "max_tokens": "256", "segment_max_size": "24"}


@pytest.mark.parametrize("batcher", ["packing", "dynamic", "single"])
def test_every_batcher_answers_as_the_original(batcher):
    engine = Engine.open(EMBED_MODEL, TOKENIZER, pack_args=PACK_ARGS, batcher=batcher, max_batch_requests=3, max_batch_tokens=48)
    try:
        assert engine.head is Head.embedding and engine.output == "sentence_embedding"
        call = engine.submit_texts(TEXTS * 3, ["sentence_embedding"], truncate=True)
        call.done().result(30)
        assert call.error() is None
        for text, got in zip(TEXTS * 3, call.outputs_block("sentence_embedding"), strict=True):
            want = reference_embedding(text)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
            assert cosine(got, want) >= 0.99999
        sizes = {f.batch.requests for f in call.futures}
        slots = {f.batch.token_slots for f in call.futures}
        if batcher == "single":
            assert sizes == {1}
        if batcher == "dynamic":  # at most 3 requests, at most 48 padded slots (24 x 2: the long text pairs with one)
            assert max(sizes) <= 3 and max(slots) <= 48
    finally:
        engine.close()


def test_a_call_answered_through_its_done_future_is_freed_without_the_garbage_collector():
    """The server's callback on `done()` holds the call: once answered, the call must go with its
    last reference (a cycle through the requests' futures would keep its arrays until a collection)."""
    import gc
    import weakref

    engine = Engine.open(EMBED_MODEL, TOKENIZER, pack_args=PACK_ARGS)
    gc.disable()
    try:
        call = engine.submit_texts(TEXTS, ["sentence_embedding"], truncate=True)
        answered = call.done()
        answered.add_done_callback(lambda _, held=call: held.outputs_block("sentence_embedding"))
        answered.result(30)
        block = weakref.ref(call.outputs_block("sentence_embedding"))
        del call, answered
        # once a later call is answered, the runner's thread has left the first one's callbacks
        engine.submit_texts(["later"], ["sentence_embedding"], truncate=True).done().result(30)
        assert block() is None
    finally:
        gc.enable()
        engine.close()


def test_the_dynamic_batchers_need_the_original_model(tmp_path):
    from poprt_lite.errors import PoprtError

    from poprt_lite import compile, ir
    from poprt_lite.compiler import CompileOptions

    packed_onnx = tmp_path / "packed.onnx"
    ir.save_model(compile(EMBED_MODEL, save=False, options=CompileOptions(pack_args=PACK_ARGS)).model, packed_onnx)
    with pytest.raises(PoprtError, match="the dynamic batcher runs the original model: pass the exported ONNX model, not a packed one"):
        Engine.open(packed_onnx, TOKENIZER, batcher="dynamic")


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    shutil.copy(TESTDATA / "deberta_v2_cls.onnx", folder / "model.onnx")
    labels = {"0": "negative", "1": "neutral", "2": "positive"}
    (folder / "config.json").write_text(json.dumps({"architectures": ["DebertaV2ForSequenceClassification"], "id2label": labels}))
    return folder


def classifier_logits(text_or_pair) -> np.ndarray:
    encoding = tokenizer().encode(*text_or_pair) if isinstance(text_or_pair, tuple) else tokenizer().encode(text_or_pair)
    ids = np.asarray(encoding.ids, np.int64)[None]
    return original(TESTDATA / "deberta_v2_cls.onnx").run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]


def test_predict_serves_a_classifier(classifier_folder):
    from fastapi.testclient import TestClient

    engine = Engine.open(classifier_folder / "model.onnx")
    try:
        assert engine.head is Head.classifier and engine.labels == ["negative", "neutral", "positive"]
        with TestClient(create_app(engine)) as client:
            single = client.post("/predict", json={"inputs": "hello world"}).json()
            logits = classifier_logits("hello world")
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            order = np.argsort(-probs, kind="stable")
            assert [p["label"] for p in single] == [engine.labels[k] for k in order]
            np.testing.assert_allclose([p["score"] for p in single], probs[order], atol=1e-5, rtol=0)
            batch = client.post("/predict", json={"inputs": [["hello", "world"], ["x"]], "raw_scores": True}).json()
            pair = classifier_logits(("hello", "world"))
            np.testing.assert_allclose(sorted((p["score"] for p in batch[0]), reverse=True), sorted(pair, reverse=True), atol=1e-4, rtol=0)
            assert len(batch) == 2
            refused = client.post("/rerank", json={"query": "a", "texts": ["b"]})
            assert refused.status_code == 422
            assert refused.json()["error"] == "/rerank needs a reranker (a sequence classifier with one label); this model is a classifier model"
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory, classifier_folder):
    """A cross-encoder with one score: the classifier's first logit (a Slice after its head)."""
    import onnx
    from onnx import helper

    folder = tmp_path_factory.mktemp("rerank")
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    model = onnx.load(TESTDATA / "deberta_v2_cls.onnx")
    graph = model.graph
    (logits,) = [o for o in graph.output if o.name == "logits"]
    for name, value in (("rerank_starts", 0), ("rerank_ends", 1), ("rerank_axes", 1)):
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray([value], np.int64), name))
    for node in graph.node:
        node.output[:] = ["all_logits" if o == "logits" else o for o in node.output]
    graph.node.append(helper.make_node("Slice", ["all_logits", "rerank_starts", "rerank_ends", "rerank_axes"], ["logits"]))
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps({"architectures": ["DebertaV2ForSequenceClassification"], "id2label": {"0": "relevant"}}))
    return folder


def test_rerank_serves_a_one_label_classifier(reranker_folder):
    from fastapi.testclient import TestClient

    engine = Engine.open(reranker_folder / "model.onnx")
    try:
        assert engine.head is Head.reranker and engine.labels == ["relevant"]
        query, texts = "hello", ["world", "x", "the world", "hello"]
        scores = np.asarray([classifier_logits((query, text))[0] for text in texts])
        order = np.argsort(-scores, kind="stable")
        with TestClient(create_app(engine)) as client:
            response = client.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True, "return_text": True})
            assert response.status_code == 200, response.text
            raw = response.json()
            assert [r["index"] for r in raw] == order.tolist()
            assert [r["text"] for r in raw] == [texts[i] for i in order]
            np.testing.assert_allclose([r["score"] for r in raw], scores[order], atol=1e-4, rtol=0)
            sigmoid = client.post("/rerank", json={"query": query, "texts": texts}).json()
            assert [r["index"] for r in sigmoid] == order.tolist() and "text" not in sigmoid[0]
            np.testing.assert_allclose([r["score"] for r in sigmoid], 1 / (1 + np.exp(-scores[order])), atol=1e-5, rtol=0)
            refused = client.post("/predict", json={"inputs": "a"})
            assert refused.status_code == 422
            assert refused.json()["error"] == (
                "/predict needs a sequence classifier with several labels (a config.json beside the tokenizer with its id2label); "
                "this model is a reranker model"
            )
    finally:
        engine.close()


def test_424_when_the_batch_fails_in_onnxruntime():
    """A batch that fails in the model answers its calls 424 (TEI's backend error) in one line; the
    server goes on: the next call is answered."""
    from fastapi.testclient import TestClient

    engine = Engine.open(EMBED_MODEL, TOKENIZER, pack_args=PACK_ARGS)
    real_run = engine.runner.session.run

    def failing_run(names, feeds):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad allocation")

    try:
        with TestClient(create_app(engine)) as client:
            engine.runner.session.run = failing_run
            failed = client.post("/embed", json={"inputs": "hello world"})
            assert failed.status_code == 424
            assert failed.json() == {
                "error": "the batch of 1 requests holding this request failed: RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad allocation",
                "error_type": "backend",
            }
            engine.runner.session.run = real_run
            answered = client.post("/embed", json={"inputs": "hello world"})
            assert answered.status_code == 200
            assert cosine(answered.json()[0], reference_embedding("hello world")) > 0.99999
            assert 'te_request_failure_total{err="backend"} 1.0' in client.get("/metrics").text
    finally:
        engine.close()


def test_a_cancelled_handler_withdraws_its_inputs():
    """Ray Serve cancels the handler of a client gone (it has no disconnect to read): the call's
    inputs still waiting leave the runner. Here the handler runs in the client's task (httpx's ASGI
    transport), which is cancelled while its input waits (a 10-minute batching timeout)."""
    import asyncio

    import httpx

    from poprt_lite.runtime.config import PackRunnerConfig

    engine = Engine.open(EMBED_MODEL, TOKENIZER, pack_args=PACK_ARGS, config=PackRunnerConfig(timeout_microseconds=600_000_000))
    runner = engine.runner

    async def scenario():
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            call = asyncio.create_task(client.post("/embed", json={"inputs": "hello world"}))
            for _ in range(600):
                if runner.pending == 1:
                    break
                await asyncio.sleep(0.01)
            assert runner.pending == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    try:
        asyncio.run(scenario())
        assert (runner.pending, runner.stats.cancelled_requests, runner.stats.batches) == (0, 1, 0)
    finally:
        engine.close()
