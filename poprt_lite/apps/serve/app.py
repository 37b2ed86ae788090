"""The HTTP application: `create_app(engine, limits)` -> a FastAPI app.

Routes, each as its ecosystem's clients expect (see the README's "Serve"):
- OpenAI: `POST /v1/embeddings` (and `/embeddings`).
- text-embeddings-inference: `POST /embed`, `/embed_all`, `/predict`, `/rerank`, `/tokenize`, `/`
  (the model's own route), `GET /info`, `/health`, `/metrics`.
- Open Inference Protocol (KServe v2, Triton's HTTP API, with its binary-tensor extension):
  `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}[/versions/{v}]`,
  `.../ready`, `POST .../infer`.

A call runs in three steps and never blocks the event loop: in a thread pool, its body is parsed
and validated, its texts tokenized and its n inputs queued on the engine's runner (the only
batcher) together; when the last input has run, the response is written from the output arrays
(orjson, or raw tensors) in the thread pool again, handed there by the runner's thread. The loop
hands the body over and is woken once, with the response: every hand-over between threads costs
CPU that the model, on the same cores, no longer has.

Errors are TEI's: a JSON body `{"error": ..., "error_type": ...}` (OpenAI routes: `{"message",
"code", "type"}`, TEI's OpenAI-compatible form): 413 a body over `payload_limit`; 422 a request the
model cannot take (validation); 429 (with Retry-After) when `max_concurrent_requests` inputs are in
flight; 401 without the API key when one is set; 503 while the model loads or the server drains;
424 a batch that failed in the runner; 404 an unknown route or model; 499 (nginx's "client closed
request", read by no one) a call whose client went away before its inputs ran: they are withdrawn
from the runner. Never a traceback.

Process-level concerns (uvicorn, signals, the drain's deadline) are the launcher's
(`apps/serve/launcher.py`): the app only exposes `app.state.front`, whose `begin_drain()` turns
/health and new calls to 503 while calls in flight finish. `engine` may be a Future of an Engine
(the launcher loads the model while the app already answers 503).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from poprt_lite import __version__
from poprt_lite.apps.serve import schemas
from poprt_lite.apps.serve.engine import Call, Engine, Head, Truncation
from poprt_lite.apps.serve.metrics import Metrics
from poprt_lite.errors import PoprtError, QueueFullError, RequestError, one_line

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
UNION_FIELDS = {
    "input": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "inputs": "a string, a list of strings, a list of token ids or a list of lists of token ids",
}


@dataclass(frozen=True)
class Limits:
    """What a server takes (TEI's flags): inputs in flight, inputs per call, body bytes, the API key."""

    max_concurrent_requests: int = 512
    max_client_batch_size: int = 2048
    payload_limit: int = 2_000_000
    api_key: str | None = None
    auto_truncate: bool = False  # truncate over-long inputs when a call does not say
    workers: int = 0  # threads that parse, tokenize and write responses (0: one per core, at most 4)


class ServeError(Exception):
    """A refusal with its HTTP status and TEI error type."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers or {}


def error_body(error: ServeError, openai: bool = False) -> bytes:
    if openai:
        return orjson.dumps({"message": error.message, "code": error.status, "type": error.error_type})
    return orjson.dumps({"error": error.message, "error_type": error.error_type})


class Withdrawal:
    """Withdraws a call's inputs not yet running when its client goes away (`Call.withdraw`), so
    that the model does no work nobody waits for and their places in flight free at once. The loop
    learns of the disconnect and a pool thread queues the inputs: whichever comes second withdraws."""

    __slots__ = ("_lock", "_call", "_gone")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call: Call | None = None
        self._gone = False

    def queued(self, call: Call) -> None:
        with self._lock:
            self._call, gone = call, self._gone
        if gone:
            call.withdraw()

    def client_gone(self) -> None:
        with self._lock:
            self._gone, call = True, self._call
        if call is not None:
            call.withdraw()

    def on_disconnect(self, receive: asyncio.Task) -> None:
        """The done callback of the task awaiting the call's next ASGI message."""
        if not receive.cancelled() and receive.exception() is None and receive.result().get("type") == "http.disconnect":
            self.client_gone()


class Front:
    """The state of one app: its engine, limits, metrics, thread pool, calls in flight, drain."""

    def __init__(self, engine: Engine | Future, limits: Limits) -> None:
        self._engine = engine
        self.limits = limits
        workers = limits.workers or min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="poprt-lite-serve")
        self.metrics = Metrics(pending=lambda: self._ready_engine.runner.pending if self._ready_engine else 0)
        self.draining = False
        self.calls = 0  # calls in flight (the drain waits for 0)
        self._inputs = 0  # inputs in flight (max_concurrent_requests bounds them)
        self._lock = threading.Lock()
        self._ready_engine: Engine | None = None  # set once the engine exists (the Future, if any, is done)
        if isinstance(engine, Future):
            engine.add_done_callback(lambda f: f.exception() is None and self._attach(f.result()))
        else:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        engine.runner.batch_listeners.append(self.metrics.observe_batch)
        self._ready_engine = engine

    @property
    def engine(self) -> Engine:
        """The engine, or 503 while it loads (or if it failed to)."""
        if self._ready_engine is not None:
            return self._ready_engine
        if isinstance(self._engine, Future) and self._engine.done():
            raise ServeError(503, "unhealthy", f"the model failed to load: {one_line(self._engine.exception())}")
        raise ServeError(503, "unhealthy", "the model is loading; retry shortly")

    @property
    def ready(self) -> bool:
        return self._ready_engine is not None and not self.draining

    def begin_drain(self) -> None:
        """Refuse new calls (503) and turn /health to 503; calls in flight finish."""
        self.draining = True

    # ------------------------------------------------------------------------------- admission

    def admit(self, n: int) -> None:
        """Take `n` inputs' places in flight, or refuse the call (429)."""
        limit = self.limits.max_concurrent_requests
        with self._lock:
            if self._inputs + n > limit:
                raise ServeError(
                    429, "overloaded", f"Model is overloaded: {self._inputs} inputs in flight, the limit is {limit}",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
            self._inputs += n

    def release(self, n: int) -> None:
        with self._lock:
            self._inputs -= n

    # ------------------------------------------------------------------------------------ calls

    async def call(
        self,
        request: Request,
        parse: type[schemas.Body] | None,
        prepare: Callable[[Any], tuple[int, Call | None, Any]],
        respond: Callable[[Any, Call | None], tuple],
        *,
        openai: bool = False,
        parsed_body: Callable[[bytes, Request], Any] | None = None,
    ) -> Response:
        """Run one call: `prepare(body)` (n inputs admitted, queued), then once they have run
        `respond` (the response body, media type and optionally more headers) and the Response
        with TEI's headers, all in the pool (`_work`); the loop only reads the body and sends the
        answer. Every failure becomes its TEI error."""
        started = time.perf_counter()
        admitted = 0
        self.calls += 1
        try:
            if self.draining:
                raise ServeError(503, "unhealthy", "the server is shutting down")
            self.engine  # 503 while the model loads
            body = await request.body()
            if parsed_body is None:
                payload = functools.partial(_parse, parse, body)
            else:
                payload = functools.partial(parsed_body, body, request.headers)
            loop = asyncio.get_running_loop()
            answer = loop.create_future()
            withdrawal = Withdrawal()
            self.pool.submit(self._work, functools.partial(_settle, loop, answer), payload, prepare, respond, started, withdrawal)
            # with the body read, the next ASGI message is the client's disconnect
            disconnect = loop.create_task(request.receive())
            disconnect.add_done_callback(withdrawal.on_disconnect)
            try:
                admitted, result = await answer
            except asyncio.CancelledError:  # Ray Serve cancels the handler of a client gone
                withdrawal.client_gone()
                raise
            finally:
                disconnect.cancel()
            if isinstance(result, BaseException):
                raise result
            self.metrics.request_success.labels("batch" if admitted > 1 else "single").inc()
            return result
        except ServeError as error:
            return self.refuse(error, openai)
        except ValidationError as error:
            return self.refuse(ServeError(422, "validation", _validation_message(error)), openai)
        except QueueFullError as error:
            return self.refuse(ServeError(429, "overloaded", str(error), {"Retry-After": str(RETRY_AFTER_S)}), openai)
        except RequestError as error:
            return self.refuse(ServeError(422, "validation", str(error)), openai)
        except PoprtError as error:  # the runner is closed: the server is going away
            return self.refuse(ServeError(503, "unhealthy", str(error)), openai)
        except Exception as error:  # a bug: logged with its traceback here, one line to the client
            log.exception("call to %s failed", request.url.path)
            return self.refuse(ServeError(500, "backend", f"internal error ({one_line(error)})"), openai)
        finally:
            self.calls -= 1
            self.metrics.request_count.labels("batch" if admitted > 1 else "single").inc()

    def _work(self, settle: Callable[[tuple], Any], payload: Callable[[], Any], prepare, respond, started: float, withdrawal: Withdrawal) -> None:
        """A call's work off the loop, in the pool: parse and `prepare` (admit and queue its inputs);
        when the last input has run (or was withdrawn), `respond` (in the pool again, started from
        the runner's thread), release the inputs' places and `settle((admitted, response))`, or
        `settle((admitted, error))` on any failure. One hand-over each way per call: the loop never
        wakes in between, and a waiter that went away leaks no admitted input."""
        try:
            admitted, call, state = prepare(payload())
        except BaseException as error:  # prepare releases what it admitted before failing
            settle((0, error))
            return
        if call is not None:
            withdrawal.queued(call)

        def finish() -> None:
            try:
                if call is not None and call.withdrawn:
                    raise ServeError(499, "client_closed", "the client closed the connection before its inputs ran")
                error = call.error() if call is not None else None
                if error is not None:
                    raise ServeError(424, "backend", one_line(error, with_type=False))
                content, media_type, *extra = respond(state, call)
                result = Response(content, media_type=media_type, headers=self._headers(started, call, extra))
            except BaseException as error:
                result = error
            finally:
                if admitted:
                    self.release(admitted)
            settle((admitted, result))

        if call is None:
            finish()
            return

        def ran(_) -> None:
            try:
                self.pool.submit(finish)
            except RuntimeError:  # the pool is shut down (the server is stopping): answer from here
                finish()

        call.done().add_done_callback(ran)

    def _headers(self, started: float, call: Call | None, extra: list[dict[str, str]]) -> dict[str, str]:
        """TEI's response headers for a call answered now, the call's durations observed."""
        elapsed = time.perf_counter() - started
        self.metrics.request_duration.observe(elapsed)
        headers = {"x-compute-type": "cpu", "x-compute-time": str(int(elapsed * 1000)), "x-total-time": str(int(elapsed * 1000))}
        if extra:
            headers.update(extra[0])
        if call is not None:
            queue_s, inference_s = call.timings()
            tokenization_s = call.tokenization_s / max(1, len(call.futures))
            self.metrics.tokenization_duration.observe(tokenization_s)
            self.metrics.queue_duration.observe(queue_s)
            self.metrics.inference_duration.observe(inference_s)
            headers.update({
                "x-compute-characters": str(call.characters),
                "x-compute-tokens": str(call.tokens),
                "x-tokenization-time": str(int(tokenization_s * 1000)),
                "x-queue-time": str(int(queue_s * 1000)),
                "x-inference-time": str(int(inference_s * 1000)),
            })
        return headers

    def refuse(self, error: ServeError, openai: bool = False) -> Response:
        """The error's TEI response; counted in te_request_failure."""
        self.metrics.request_failure.labels(error.error_type).inc()
        return Response(error_body(error, openai), status_code=error.status, media_type="application/json", headers=error.headers)

    def queue_inputs(self, engine: Engine, inputs: list, outputs: list[str], truncate: bool | None, direction: str) -> tuple[int, Call]:
        """Admit and queue a call's inputs (texts, or lists of token ids)."""
        n = len(inputs)
        if n == 0:
            raise ServeError(422, "validation", "`inputs` cannot be empty")
        if n > self.limits.max_client_batch_size:
            raise ServeError(
                422, "validation", f"batch size {n} > maximum allowed batch size {self.limits.max_client_batch_size}"
            )
        truncate = self.limits.auto_truncate if truncate is None else truncate
        direction = Truncation(direction.lower())
        self.admit(n)
        try:
            if isinstance(inputs[0], (str, tuple)):
                return n, engine.submit_texts(inputs, outputs, truncate=truncate, direction=direction)
            return n, engine.submit([_id_feeds(engine, ids, truncate, direction) for ids in inputs], outputs)
        except BaseException:
            self.release(n)
            raise


def create_app(engine: Engine | Future, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (or the Future of one: 503 until it is done)."""
    front = Front(engine, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        front.pool.shutdown(wait=False, cancel_futures=True)

    # FastAPI's native OpenTelemetry (in the versions that have it) looks the global providers up on
    # every call to learn that none is set: off
    untraced = {"telemetry": {"tracing": False, "metrics": False, "logs": False}} if "telemetry" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(title="poprt-lite", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, **untraced)
    app.state.front = front

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kinds = {404: "not_found", 405: "validation"}
        error = ServeError(exc.status_code, kinds.get(exc.status_code, "validation"), f"{exc.detail}: {request.method} {request.url.path}")
        return Response(error_body(error), status_code=error.status, media_type="application/json")  # not a call: not counted

    def post(*paths: str):
        """The decorated handler (it takes the Request itself) as Starlette's plain route at each path:
        FastAPI's routes would solve parameters and open two exit stacks per call for nothing."""

        def add(endpoint):
            for path in paths:
                app.add_route(path, endpoint, methods=["POST"])
            return endpoint

        return add

    # ------------------------------------------------------------------------------ embeddings

    def openai_prepare(body: schemas.OpenAIEmbeddingRequest):
        engine = _need(front.engine, Head.embedding, "/v1/embeddings")
        dim = engine.interface.outputs[engine.output].trailing[-1]
        if body.dimensions is not None:
            if body.dimensions > dim:
                raise ServeError(422, "validation", f"`dimensions` {body.dimensions} > the model's embedding size {dim}")
        n, call = front.queue_inputs(engine, _as_list(body.input), [engine.output], None, "right")
        return n, call, (engine, body)

    def openai_respond(state, call: Call) -> tuple[bytes, str]:
        engine, body = state
        vectors = call.outputs_block(engine.output)
        if body.dimensions is not None:
            # truncating is only meaningful for a model trained to be cut (Matryoshka), whose
            # embeddings come out normalized; a model's own vectors tell whether it normalizes
            if not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4):
                raise ServeError(422, "validation", "`dimensions` needs a model whose embeddings are L2-normalized; this model's are not")
            vectors = vectors[:, : body.dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.ascontiguousarray(vectors, np.float32)
        if body.encoding_format == "base64":
            data = [{"object": "embedding", "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode(), "index": i} for i, v in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": call.tokens, "total_tokens": call.tokens}
        return _json({"object": "list", "data": data, "model": body.model or engine.model_id, "usage": usage})

    @post("/v1/embeddings", "/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        return await front.call(request, schemas.OpenAIEmbeddingRequest, openai_prepare, openai_respond, openai=True)

    def embed_prepare(body: schemas.EmbedRequest):
        engine = _need(front.engine, Head.embedding, "/embed")
        n, call = front.queue_inputs(engine, _as_list(body.inputs), [engine.output], body.truncate, body.truncation_direction)
        return n, call, (engine, body)

    def embed_respond(state, call: Call) -> tuple[bytes, str]:
        engine, body = state
        vectors = call.outputs_block(engine.output)
        if body.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return _json(np.ascontiguousarray(vectors, np.float32))

    @post("/embed")
    async def embed(request: Request) -> Response:
        return await front.call(request, schemas.EmbedRequest, embed_prepare, embed_respond)

    def embed_all_prepare(body: schemas.EmbedAllRequest):
        engine = front.engine
        if engine.token_output is None:
            raise ServeError(422, "validation", f"/embed_all needs one per-token output with an embedding axis; this model's outputs are: {', '.join(engine.interface.outputs)}")
        n, call = front.queue_inputs(engine, _as_list(body.inputs), [engine.token_output], body.truncate, body.truncation_direction)
        return n, call, engine

    def embed_all_respond(engine, call: Call) -> tuple[bytes, str]:
        return _json([out[engine.token_output] for out in call.outputs])

    @post("/embed_all")
    async def embed_all(request: Request) -> Response:
        return await front.call(request, schemas.EmbedAllRequest, embed_all_prepare, embed_all_respond)

    # --------------------------------------------------------------------- classifiers, rerankers

    def predict_prepare(body: schemas.PredictRequest):
        engine = _need(front.engine, Head.classifier, "/predict")
        single, texts = _predict_inputs(body.inputs)
        n, call = front.queue_inputs(engine, texts, [engine.output], body.truncate, body.truncation_direction)
        return n, call, (engine, body, single)

    def predict_respond(state, call: Call) -> tuple[bytes, str]:
        engine, body, single = state
        logits = call.outputs_block(engine.output).reshape(len(call.outputs), -1)
        scores = logits if body.raw_scores else _softmax(logits)
        ranked = [
            [{"score": float(row[k]), "label": engine.labels[k]} for k in np.argsort(-row, kind="stable")] for row in scores
        ]
        return _json(ranked[0] if single else ranked)

    @post("/predict")
    async def predict(request: Request) -> Response:
        return await front.call(request, schemas.PredictRequest, predict_prepare, predict_respond)

    def rerank_prepare(body: schemas.RerankRequest):
        engine = _need(front.engine, Head.reranker, "/rerank")
        pairs = [(body.query, text) for text in body.texts]
        n, call = front.queue_inputs(engine, pairs, [engine.output], body.truncate, body.truncation_direction)
        return n, call, (engine, body)

    def rerank_respond(state, call: Call) -> tuple[bytes, str]:
        engine, body = state
        logits = call.outputs_block(engine.output).reshape(len(call.outputs))
        scores = logits if body.raw_scores else 1.0 / (1.0 + np.exp(-logits))
        ranks = []
        for i in np.argsort(-scores, kind="stable"):
            rank = {"index": int(i), "score": float(scores[i])}
            if body.return_text:
                rank["text"] = body.texts[i]
            ranks.append(rank)
        return _json(ranks)

    @post("/rerank")
    async def rerank(request: Request) -> Response:
        return await front.call(request, schemas.RerankRequest, rerank_prepare, rerank_respond)

    @post("/")
    async def model_route(request: Request) -> Response:
        """TEI's route for whatever the model is: /embed, /predict or /rerank."""
        head = front.engine.head if front.ready else None
        if head is Head.classifier:
            return await predict(request)
        if head is Head.reranker:
            return await rerank(request)
        return await embed(request)

    # ------------------------------------------------------------------------- tokenizer, info

    def tokenize_prepare(body: schemas.TokenizeRequest):
        engine = front.engine
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        encodings = engine.encode(texts, truncate=False, add_special_tokens=body.add_special_tokens)
        return 0, None, [[_token(e, text, i) for i in range(len(e.ids))] for e, text in zip(encodings, texts, strict=True)]

    @post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await front.call(request, schemas.TokenizeRequest, tokenize_prepare, lambda tokens, _: _json(tokens))

    @app.get("/info")
    async def info() -> Response:
        try:
            data = front.engine.info()
        except ServeError as error:
            return front.refuse(error)
        limits = front.limits
        data.update({
            "max_concurrent_requests": limits.max_concurrent_requests,
            "max_client_batch_size": limits.max_client_batch_size,
            "auto_truncate": limits.auto_truncate,
            "tokenization_workers": front.pool._max_workers,
            "version": __version__,
        })
        return Response(orjson.dumps(data), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        if front.ready:
            return Response(status_code=200)
        error = ServeError(503, "unhealthy", "the server is shutting down" if front.draining else _loading(front))
        return front.refuse(error)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(front.metrics.render(), media_type=front.metrics.content_type)

    # --------------------------------------------------------------------------- KServe v2 / OIP

    from poprt_lite.apps.serve import oip

    oip.add_routes(app, front)

    app.add_middleware(_Gate, front=front)
    return app


class _Gate:
    """ASGI middleware: the API key (401) and the payload limit (413), before the app reads a byte
    more than it must. Health probes need no key."""

    OPEN = ("/health", "/v2/health/live", "/v2/health/ready")

    def __init__(self, app, front: Front) -> None:
        self.app, self.front = app, front

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        openai = scope["path"] in ("/v1/embeddings", "/embeddings")
        key = self.front.limits.api_key
        if key is not None and scope["path"] not in self.OPEN:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                error = ServeError(401, "unauthorized", "a valid API key is required: send the header 'Authorization: Bearer KEY'")
                return await self._send(send, error, openai)
        limit = self.front.limits.payload_limit
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._send(send, self._too_large(limit), openai)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._send(send, self._too_large(limit), openai)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _too_large(limit: int) -> ServeError:
        return ServeError(413, "payload_limit", f"the request body is larger than the payload limit of {limit} bytes")

    async def _send(self, send, error: ServeError, openai: bool) -> None:
        self.front.metrics.request_count.labels("single").inc()
        self.front.metrics.request_failure.labels(error.error_type).inc()
        body = error_body(error, openai)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------- helpers


def _parse(model: type[schemas.Body], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise ServeError(422, "validation", f"the request body is not valid JSON ({error.errors()[0]['msg']})") from None
        raise


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any) -> None:
    """Hand `value` to the loop's `future`, from another thread; nobody waits any more if the
    handler was cancelled or the loop has closed."""

    def set_result() -> None:
        if not future.done():
            future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop has closed
        loop.call_soon_threadsafe(set_result)


def _validation_message(error: ValidationError) -> str:
    errors = error.errors()
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else "body"
    if first["type"] == "missing":
        return f"`{field}` is missing"
    if field in UNION_FIELDS and len({e["loc"][0] for e in errors if e["loc"]}) == 1:
        return f"`{field}` must be {UNION_FIELDS[field]}"
    where = ".".join(str(part) for part in first["loc"])
    return f"`{where}`: {first['msg']}"


def _json(value: Any) -> tuple[bytes, str]:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY), "application/json"


def _as_list(inputs) -> list:
    """One input (a string, or token ids) as a batch of one; a batch as it is."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        return [inputs]
    return list(inputs)


def _id_feeds(engine: Engine, ids: list[int], truncate: bool, direction: Truncation) -> dict[str, np.ndarray]:
    if truncate and len(ids) > engine.max_length:
        ids = ids[: engine.max_length] if direction is Truncation.right else ids[-engine.max_length :]
    if not ids:
        raise ServeError(422, "validation", "`inputs` cannot be empty")
    return {engine.interface.dynamic_input: np.asarray(ids, np.int64)}


def _need(engine: Engine, head: Head, route: str) -> Engine:
    if engine.head is head:
        return engine
    what = {
        Head.embedding: "a sentence-embedding model (one pooled output)",
        Head.classifier: "a sequence classifier with several labels (a config.json beside the tokenizer with its id2label)",
        Head.reranker: "a reranker (a sequence classifier with one label)",
    }[head]
    raise ServeError(422, "validation", f"{route} needs {what}; this model is {_a(engine.head.value)} model")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _predict_inputs(inputs) -> tuple[bool, list]:
    """TEI's /predict input: a text, a pair [a, b], or a batch of [text] / [a, b]."""
    def sequence(value):
        if len(value) == 1:
            return value[0]
        if len(value) == 2:
            return (value[0], value[1])
        raise ServeError(422, "validation", f"`inputs`: a sequence is one text or a pair of texts, got {len(value)}")

    if isinstance(inputs, str):
        return True, [inputs]
    if inputs and isinstance(inputs[0], str):
        return True, [sequence(inputs)]
    return False, [sequence(value) for value in inputs]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _token(encoding, text: str, i: int) -> dict[str, Any]:
    special = bool(encoding.special_tokens_mask[i])
    start, stop = encoding.offsets[i]
    return {
        "id": encoding.ids[i],
        "text": encoding.tokens[i] if special else text[start:stop],
        "special": special,
        "start": None if special else start,
        "stop": None if special else stop,
    }


def _loading(front: Front) -> str:
    try:
        front.engine
    except ServeError as error:
        return error.message
    return "the model is not ready"

