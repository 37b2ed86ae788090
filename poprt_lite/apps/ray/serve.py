"""Replicated serving on Ray Serve: `poprt-lite serve MODEL --ray ... --replicas N`.

The deployment is the very FastAPI application of `poprt-lite serve` (`apps/serve/app.py`'s
`create_app`), mounted by `@serve.ingress`: each replica builds its own `Engine` on its own
PackRunner, the only batcher (no `@serve.batch` in front: the PackRunner batches by tokens), and
answers every route, status and error body exactly as the single-process server does. Serve's proxy
(one, on the head node, at `--host`/`--port`) spreads the calls over the replicas.

The model reaches the replicas without a shared filesystem (`ShippedServer`): the driver opens it
(an exported model is packed here, once) and puts the artifact and the files of the tokenizer folder
the engine reads into the object store; each replica recreates that folder in a temporary place to
build its engine, as `Engine.open` would from the original. The driver builds one engine the same
way first, so a model that cannot be served is refused here, in one line, not in every replica.

A replica that dies is replaced by Serve's controller; the calls it held fail with a 5xx (which a
client retries), and no call is answered by another call's result. `run` blocks until SIGTERM or
SIGINT, then drains as the single-process server does: through a `Drain` actor every replica's app
turns /health and new calls to 503 while its calls in flight finish; once every replica has
finished (or `graceful_shutdown_s` after the signal; a second signal stops waiting), the application
is deleted, each replica closing its runner.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from poprt_lite.apps.embed import LENGTH_LIMITS, TOKENIZER_FILE, open_artifact
from poprt_lite.apps.export import resolve_model
from poprt_lite.apps.ray.shipped import ShippedArtifact
from poprt_lite.apps.serve.app import Limits, create_app
from poprt_lite.apps.serve.engine import CONFIG_FILE, Engine, tokenizer_of
from poprt_lite.runtime.config import PackRunnerConfig
from poprt_lite.runtime.pack_runner import PackRunner

APP_NAME = "poprt-lite"
FOLDER_FILES = (*(name for name, _ in LENGTH_LIMITS), CONFIG_FILE)  # what an engine reads beside the tokenizer.json


@dataclass(frozen=True)
class ShippedServer:
    """What a replica needs to build the engine the driver would: the artifact, the tokenizer
    folder's files (none: a model served by token ids only) and the engine's options."""

    artifact: ShippedArtifact
    tokenizer_files: dict[str, bytes]
    max_length: int | None
    output: str | None
    model_id: str

    @classmethod
    def of(
        cls,
        model: str | os.PathLike,
        tokenizer: str | os.PathLike | None = None,
        *,
        max_length: int | None = None,
        output: str | None = None,
        model_id: str | None = None,
        **packing: Any,
    ) -> "ShippedServer":
        """`packing`: open_artifact's keywords (pack_args, input_shape, precision) for an exported model."""
        model_id = model_id or Path(model).stem
        model = resolve_model(model)  # a model folder: its export, made on first use (as Engine.open)
        tokenizer = tokenizer_of(model, tokenizer)
        artifact = open_artifact(model, tokenizer, max_length=max_length, **packing)
        files = {}
        if tokenizer is not None:
            file = Path(tokenizer) / TOKENIZER_FILE if Path(tokenizer).is_dir() else Path(tokenizer)
            files = {TOKENIZER_FILE: file.read_bytes()}
            files |= {name: (file.parent / name).read_bytes() for name in FOLDER_FILES if (file.parent / name).is_file()}
        return cls(ShippedArtifact.of(artifact), files, max_length, output, model_id)

    def engine(self, config: PackRunnerConfig | None, threads: int) -> Engine:
        """An engine on a new PackRunner of `threads` threads."""
        runner = PackRunner(self.artifact.open(), config, threads=threads)
        try:
            with tempfile.TemporaryDirectory(prefix="poprt-lite-tokenizer-") as folder:
                for name, data in self.tokenizer_files.items():
                    (Path(folder) / name).write_bytes(data)
                tokenizer = folder if self.tokenizer_files else None
                return Engine(runner, runner.interface, tokenizer=tokenizer, max_length=self.max_length, output=self.output, model_id=self.model_id)
        except BaseException:
            runner.close()
            raise


@ray.remote(num_cpus=0)
class Drain:
    """The command's drain, told to every replica: `start()` on SIGTERM; a replica's `wait()` returns
    then (at once for a replica that starts later), and the replica reports `drained()` when its
    calls in flight are done."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.replicas: set[str] = set()

    async def wait(self) -> None:
        await self.started.wait()

    async def start(self) -> None:
        self.started.set()

    async def drained(self, replica: str) -> None:
        self.replicas.add(replica)

    async def count(self) -> int:
        return len(self.replicas)


@serve.ingress()
class Replica:
    """One replica: its engine (a PackRunner) and `poprt-lite serve`'s app on it."""

    async def __init__(self, shipped: list, limits: Limits, config: PackRunnerConfig, threads: int, graceful_shutdown_s: float, drain) -> None:
        (reference,) = shipped  # nested, so the replica fetches it (a replacement replica too)
        self.engine = (await reference).engine(config, threads)
        self.limits, self.graceful_shutdown_s, self.drain = limits, graceful_shutdown_s, drain

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.engine, self.limits)
        threading.Thread(target=self._drain_when_told, args=(app.state.front,), name="poprt-lite-drain", daemon=True).start()
        return app

    def _drain_when_told(self, front) -> None:
        ray.get(self.drain.wait.remote())
        front.begin_drain()  # /health and new calls: 503
        deadline = time.monotonic() + self.graceful_shutdown_s
        while front.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        self.drain.drained.remote(ray.get_runtime_context().get_actor_id())

    def __del__(self) -> None:
        self.engine.close(timeout=self.graceful_shutdown_s)


def deploy(
    shipped: ShippedServer,
    limits: Limits,
    config: PackRunnerConfig,
    *,
    threads: int = 1,
    replicas: int = 1,
    autoscaling_config: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    graceful_shutdown_s: float = 10.0,
    drain: Any = None,
) -> ray.ObjectRef:
    """Start Serve's proxy at `host`:`port` (on the head node) and run the application: `replicas`
    replicas, or Serve's autoscaling within `autoscaling_config` (its AutoscalingConfig fields), each
    of `threads` onnxruntime threads and as many CPUs, draining when `drain` (a `Drain`, default a
    new one) starts. Returns the shipped model's reference, which must stay alive as long as replicas
    may start."""
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": replicas}
    deployment = serve.deployment(
        Replica, name=APP_NAME, ray_actor_options={"num_cpus": threads}, max_ongoing_requests=limits.max_concurrent_requests,
        graceful_shutdown_timeout_s=graceful_shutdown_s, **scale,
    )
    reference = ray.put(shipped)
    drain = Drain.remote() if drain is None else drain
    serve.run(deployment.bind([reference], limits, config, threads, graceful_shutdown_s, drain), name=APP_NAME, route_prefix="/")
    return reference


def run(shipped: ShippedServer, limits: Limits, config: PackRunnerConfig, **options: Any) -> None:
    """`deploy`, then serve until SIGTERM or SIGINT; then drain (see the module docstring), delete the
    application and, if no other application is left, Serve's proxy and controller."""
    signals = threading.Semaphore(0)
    previous = {sig: signal.signal(sig, lambda sig, frame: signals.release()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        drain = Drain.remote()
        reference = deploy(shipped, limits, config, drain=drain, **options)  # noqa: F841  (held while serving)
        host, port = options.get("host", "127.0.0.1"), options.get("port", 8080)
        scale = options.get("autoscaling_config") or options.get("replicas", 1)
        print(f"poprt-lite serve: {shipped.model_id} ready on http://{host}:{port} (Ray Serve, replicas: {scale})", file=sys.stderr, flush=True)
        while not signals.acquire(timeout=0.5):
            pass
        running = serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states.get("RUNNING", 0)
        print(f"poprt-lite serve: draining {running} replicas", file=sys.stderr, flush=True)
        ray.get(drain.start.remote())
        deadline = time.monotonic() + options.get("graceful_shutdown_s", 10.0)
        while ray.get(drain.count.remote()) < running and time.monotonic() < deadline and not signals.acquire(timeout=0.05):
            pass
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
