"""Running the app in this process: uvicorn, signals and the drain (process-level concerns the app
leaves to its host).

The model loads in a thread while the server already listens (/health answers 503 until it is
ready). The first SIGTERM or SIGINT starts the drain: /health and new calls get 503, calls in
flight finish; once none is left, or `graceful_shutdown_s` after the signal, uvicorn stops and the
runner closes. A second signal stops at once. The process then exits 0 (uvicorn's own handlers would
re-raise the signal after a graceful stop, which ends the process with the signal's status).
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import uvicorn

from poprt_lite.apps.serve.app import Front, Limits, create_app
from poprt_lite.apps.serve.engine import Engine

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
KEEP_ALIVE_S = 75  # nginx's default idle keep-alive


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, front: Front, loading: Future, grace_s: float) -> None:
        super().__init__(config)
        self.front, self.loading, self.grace_s = front, loading, grace_s
        self.deadline: float | None = None
        self.announced = False

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29 spelling; capture_signals below is the current one
        pass

    def capture_signals(self):
        import contextlib

        @contextlib.contextmanager
        def captured():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        return captured()

    def handle_exit(self, sig: int, frame) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_s
            self.front.begin_drain()
            print(f"poprt-lite serve: {signal.Signals(sig).name}: draining ({self.front.calls} calls in flight)", file=sys.stderr, flush=True)
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.loading.done() and not self.announced:
            self.announced = True
            if self.loading.exception() is not None:
                return True
            host, port = self.config.host, self.config.port
            print(f"poprt-lite serve: {self.loading.result().model_id} ready on http://{host}:{port}", file=sys.stderr, flush=True)
        if self.deadline is None:
            return False
        remaining = self.deadline - time.monotonic()
        if self.front.calls == 0 or remaining <= 0:
            # uvicorn closes the connections and gives calls still running what is left of the drain
            self.config.timeout_graceful_shutdown = max(0.0, remaining)
            return True
        return False


def serve(
    open_engine: Callable[[], Engine],
    limits: Limits,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    graceful_shutdown_s: float = 10.0,
    log_level: str = "warning",
) -> None:
    """Serve the engine `open_engine()` builds (in a thread) until a signal; raise its error if it
    cannot be built."""
    loading: Future = Future()

    def load() -> None:
        try:
            engine = open_engine()
            # what loading made (modules, the packed graph, the tokenizer) lives as long as the
            # process: frozen, the collector's full passes no longer walk it every few hundred
            # calls (measured with the real MiniLM: 0.1 ms of CPU per call)
            gc.collect()
            gc.freeze()
            loading.set_result(engine)
        except BaseException as exc:
            loading.set_exception(exc)

    threading.Thread(target=load, name="poprt-lite-load", daemon=True).start()
    app = create_app(loading, limits)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=graceful_shutdown_s,
        # uvicorn's default 5 s closes the connection of a client that pauses that long, racing
        # its next call (a load balancer's pool expects the server to keep connections longer)
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = _DrainingServer(config, app.state.front, loading, graceful_shutdown_s)
    print(f"poprt-lite serve: listening on http://{host}:{port} (loading the model)", file=sys.stderr, flush=True)
    server.run()
    if not loading.done():
        return  # stopped before the model loaded; the loading thread is a daemon
    if loading.exception() is not None:
        raise loading.exception()
    remaining = graceful_shutdown_s if server.deadline is None else max(0.0, server.deadline - time.monotonic())
    loading.result().close(timeout=remaining)
