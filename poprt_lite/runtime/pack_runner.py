"""PackRunner: online packing of single requests into the fixed batches of a packed artifact.

Clients call `execute_async(feeds, outputs)` with one unpadded request (its own `input_ids`, ...)
and get a future; `execute` blocks until the request's `outputs` arrays are filled. Requests are
placed, in arrival order, into the open batch by an `OnlinePacker` (first_fit / next_fit over rows
in AttentionMask mode; one stream of `batch_size * seq_len` tokens in unpack/repack mode; in
token_stream mode one stream of at most `max_tokens` tokens, run at its own length `[1, T]`). A
request that does not fit waits for the next batch. In token_stream mode, whose attention pads every
request to the batch's longest, a batch of mixed lengths runs as several model calls of similar
lengths (`runtime/packing.length_groups`); each call is a `BatchRun`. A background thread launches
the open batch when the model is free and the batch is full (a request did not fit, or it holds `max_valid_num`
requests, or no token slot is left), or when its oldest request has waited `timeout_microseconds`.
While the previous batch still runs, later requests may fill the room a refused request left, until
`lookahead + 1` requests have not fitted. The thread builds the packed feeds with numpy, runs the
model, copies each request's slice of every output into the caller's arrays and completes the
futures. The next batch takes the waiting requests oldest first.

Each request is checked in the caller's thread before it is queued (`runtime/requests.py`), so a
bad request fails only its own call. A completed future tells when its request arrived (`queued`)
and which batch ran it (`batch`, a `BatchRun`); `batch_listeners` are told of every batch run (a
server's metrics). Feeds are laid out and outputs split by the artifact's batch
layout (`runtime/layouts.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from poprt_lite.ir.artifact import Artifact, load_artifact
from poprt_lite.errors import PoprtError, QueueFullError, RequestError, one_line
from poprt_lite.runtime.config import PackRunnerConfig, resolve_batching
from poprt_lite.runtime.interface import read_packed_interface
from poprt_lite.runtime.layouts import Placement
from poprt_lite.runtime.offline import calls_of
from poprt_lite.runtime.packing import OnlinePacker
from poprt_lite.runtime.requests import RequestChecker, build_feeds, split_outputs
from poprt_lite.runtime.session import artifact_session

log = logging.getLogger(__name__)

CANCELLED = "the PackRunner was closed before this request ran"


class PackFuture(concurrent.futures.Future):
    """The pending result of one request: a `concurrent.futures.Future` with PopRT's `wait()`
    (`cancel()` withdraws a request whose batch has not started).

    `result()` returns the request's `outputs` dict once it is filled (or raises the request's
    error); `exception()` returns the error or None; `done()` tells without blocking. `queued` is
    when the request was queued and `batch` the batch that ran it (set before the future
    completes; None until then), both on the `time.monotonic()` clock.
    """

    queued: float = 0.0
    batch: BatchRun | None = None
    _runner: PackRunner | None = None  # it withdraws the request (no link back: no reference cycle)

    def cancel(self) -> bool:
        """Withdraw the request if its batch has not started (True); False once it runs or ran."""
        if not super().cancel():
            return False
        if self._runner is not None:
            self._runner._withdraw(self)
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the request's outputs are filled; raise its error if it failed.

        Raises `concurrent.futures.TimeoutError` (the builtin TimeoutError) if `timeout` seconds pass.
        """
        self.result(timeout)


@dataclass(frozen=True)
class BatchRun:
    """One batch a runner ran (times on the `time.monotonic()` clock)."""

    requests: int
    tokens: int  # real tokens
    token_slots: int  # token slots the model ran (real tokens + padding)
    started: float  # the model run began (the requests' wait in the queue ends here)
    finished: float  # the model run ended (outputs not yet copied)


@dataclass(frozen=True)
class PackRunnerStats:
    """Counters of a PackRunner since it started (a snapshot)."""

    batches: int  # model calls run (including failed ones): a token_stream batch may run as several
    requests: int  # requests in those batches
    tokens: int  # real tokens in those batches
    token_slots: int  # token slots the model ran: batch_size * seq_len per batch (token_stream: its tokens)
    batches_by_fullness: int  # launched because no further request fitted
    batches_by_timeout: int  # launched because the oldest request waited timeout_microseconds
    batches_by_close: int  # launched early to drain the runner on close()
    failed_batches: int
    failed_requests: int  # requests whose future holds an error (failed batch or output copy)
    overtakes: int  # requests placed ahead of an older one that did not fit (the lookahead at work)
    cancelled_requests: int  # withdrawn by `future.cancel()` before their batch started

    @property
    def mean_requests_per_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / token slots over all batches run."""
        return self.tokens / self.token_slots if self.token_slots else 0.0

    def __str__(self) -> str:
        return (
            f"{self.batches} batches ({self.batches_by_fullness} full, {self.batches_by_timeout} by "
            f"timeout, {self.batches_by_close} on close, {self.failed_batches} failed), "
            f"{self.requests} requests ({self.overtakes} overtaking), {self.mean_requests_per_batch:.2f} "
            f"requests/batch, packing efficiency {self.packing_efficiency:.1%}"
        )


class _Request:
    __slots__ = ("length", "tokens", "outputs", "future", "arrived")

    def __init__(self, length: int, tokens: dict, outputs: dict, arrived: float) -> None:
        self.length = length
        self.tokens = tokens  # token input name -> [n, ...] array of the model's dtype
        self.outputs = outputs  # output name -> caller's array
        self.future = PackFuture()
        self.future.queued = arrived
        self.arrived = arrived


class PackRunner:
    """Serves single requests from many threads by packing them into a packed artifact's batches.

    Created by `runtime.Runner(path, config)`; use it as a context manager or call `close()`.
    `threads` is onnxruntime's intra-op thread count (0: every core); `spinning=True` lets
    onnxruntime's threads busy-wait between runs (faster only when cores are to spare).
    """

    def __init__(
        self,
        source: str | os.PathLike | Artifact,
        config: PackRunnerConfig | None = None,
        threads: int = 0,
        spinning: bool = False,
    ) -> None:
        config = config if config is not None else PackRunnerConfig()
        if not isinstance(config, PackRunnerConfig):
            raise PoprtError(f"config must be a runtime.PackRunnerConfig, got {type(config).__name__}")
        config.validate()
        self.artifact = source if isinstance(source, Artifact) else load_artifact(source)
        self.interface = read_packed_interface(self.artifact)
        self.batching = resolve_batching(config, self.interface)
        self.inputs = {spec["name"]: spec for spec in self.artifact.manifest["inputs"]}
        self._layout = self.interface.layout
        self._checker = RequestChecker(self.interface)
        try:
            # onnxruntime's worker threads spin after each run by default, taking the cores from the
            # client threads and the serving thread between batches (measured up to 2x slower on
            # 2 cores); a PackRunner runs its session without spinning unless asked.
            self.session = artifact_session(self.artifact, threads, spinning=spinning)
        except Exception as exc:
            raise PoprtError(f"onnxruntime cannot load artifact '{self.artifact.path}': {one_line(exc)}") from exc
        across_rows = self._layout.across_rows
        self._new_packer = functools.partial(
            OnlinePacker,
            self.batching.algorithm,
            self.batch_size,
            self.seq_len,
            self.batching.max_valid_num,
            across_rows,
            segment_max_size=self.segment_max_size if across_rows else None,
        )
        self._packer = self._new_packer()
        self._cond = threading.Condition()
        self._open: list[_Request] = []  # requests in the batch being filled
        self._refused = 0  # requests that did not fit the open batch (they wait in _waiting)
        self._waiting: collections.deque[_Request] = collections.deque()  # for later batches
        self._closing = False
        self._cancelling = False  # close(cancel_pending=True): no further model call starts
        self._stopped: BaseException | None = None  # the serving thread died of this
        self._counts = collections.Counter()
        # called in the serving thread with each BatchRun, before its futures complete; one that
        # raises is logged and does not fail the batch
        self.batch_listeners: list[Callable[[BatchRun], None]] = []
        self._thread = threading.Thread(target=self._serve, name="poprt-lite-pack-runner", daemon=True)
        self._thread.start()

    # The artifact's and the config's settings, under PopRT's names.
    mode = property(lambda self: self.interface.mode)
    max_valid_num = property(lambda self: self.interface.max_valid_num)
    segment_max_size = property(lambda self: self.interface.segment_max_size)
    batch_size = property(lambda self: self.interface.batch_size)
    seq_len = property(lambda self: self.interface.seq_len)
    dynamic_input_name = property(lambda self: self.interface.dynamic_input)
    position_offset = property(lambda self: self.interface.position_offset)
    algorithm = property(lambda self: self.batching.algorithm)
    lookahead = property(lambda self: self.batching.lookahead)
    max_pending = property(lambda self: self.batching.max_pending)
    timeout_microseconds = property(lambda self: self.batching.timeout_microseconds)

    # ------------------------------------------------------------------------------- public API

    @property
    def output_names(self) -> list[str]:
        return list(self.interface.outputs)

    @property
    def stats(self) -> PackRunnerStats:
        with self._cond:
            counts = dict(self._counts)
        return PackRunnerStats(**{f: counts.get(f, 0) for f in PackRunnerStats.__dataclass_fields__})

    @property
    def pending(self) -> int:
        """Requests queued, not withdrawn and not yet running."""
        with self._cond:
            return len(self._waiting) + sum(not r.future.cancelled() for r in self._open)

    def execute_async(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray] | None = None) -> PackFuture:
        """Queue one request and return its future. The request is checked here: a bad one raises
        RequestError on this call and nothing is queued. With `outputs=None` the runner allocates
        `[n, ...]` arrays for every output (returned by `future.result()`). With `max_pending` set
        and that many requests waiting, raises QueueFullError and queues nothing."""
        checked = self._checker.check(feeds, outputs)
        request = _Request(checked.length, checked.tokens, checked.outputs, time.monotonic())
        request.future._runner = self
        with self._cond:
            if self._closing or self._stopped is not None:
                reason = f" (it stopped: {one_line(self._stopped)})" if self._stopped else ""
                raise PoprtError(f"the PackRunner is closed{reason}; create a new one")
            # places taken (O(1) on every call): a withdrawn request still in the open batch holds one
            if self.max_pending is not None and len(self._open) + len(self._waiting) >= self.max_pending:
                raise QueueFullError(
                    f"the PackRunner already has {self.max_pending} requests waiting (max_pending); "
                    "retry later or raise max_pending"
                )
            self._enqueue(request)
        return request.future

    def execute(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run one request and block until its `outputs` are filled; return them."""
        return self.execute_async(feeds, outputs).result()

    def close(self, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests. Pending requests are run at once (without waiting for the timeout)
        or, with `cancel_pending`, failed with PoprtError, as are the requests of a taken batch's
        length-group calls not yet started. Waits up to `timeout` seconds (default: until the model
        call being run, if any, finishes) for the serving thread. Idempotent."""
        cancelled: list[_Request] = []
        with self._cond:
            if not self._closing:
                self._closing = True
                self._cancelling = cancel_pending
                if cancel_pending:
                    cancelled = self._open + list(self._waiting)
                    self._open, self._waiting = [], collections.deque()
                    self._packer.reset()
                    self._refused = 0
                self._cond.notify_all()
        self._fail(cancelled, PoprtError(CANCELLED))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> PackRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PackRunner(mode={self.mode}, batch={self.batch_size}x{self.seq_len}, "
            f"max_valid_num={self.max_valid_num}, segment_max_size={self.segment_max_size}, "
            f"algorithm={self.algorithm.value}, lookahead={self.lookahead}, "
            f"timeout_microseconds={self.timeout_microseconds})"
        )

    def _withdraw(self, future: PackFuture) -> None:
        """A request's future was cancelled: it leaves the queue, or the open batch, which is laid out
        again without it and takes waiting requests into the place it frees. (First and next fit can
        fail to lay out the rest of an AttentionMask batch again: then the place stays empty and the
        request leaves when the batch is taken, `_take`.)"""
        with self._cond:
            self._counts["cancelled_requests"] += 1
            rest = [r for r in self._open if r.future is not future]
            if len(rest) == len(self._open):
                self._waiting = collections.deque(r for r in self._waiting if r.future is not future)
                return
            packer = self._new_packer()
            if all(packer.try_add(r.length) for r in rest):
                self._open, self._packer = rest, packer
                self._refill()

    def _enqueue(self, request: _Request) -> None:
        """Place `request` in the open batch, or queue it for a later one (lock held)."""
        if self._open_full:
            self._waiting.append(request)
        elif self._packer.try_add(request.length):
            self._place(request)
        else:
            self._waiting.append(request)
            self._refuse()

    def _refill(self) -> None:
        """Fill the open batch from the waiting requests, oldest first (lock held).

        Requests that do not fit stay at the front of the queue, in order, for the next batch."""
        refused = []
        while self._waiting and not self._open_full:
            request = self._waiting.popleft()
            if self._packer.try_add(request.length):
                self._place(request)
            else:
                refused.append(request)
                self._refuse()
        self._waiting.extendleft(reversed(refused))

    @property
    def _open_full(self) -> bool:
        """The open batch takes no further request (lock held)."""
        return self._refused > self.lookahead or self._packer.is_full

    def _place(self, request: _Request) -> None:
        self._open.append(request)
        if self._refused:
            self._counts["overtakes"] += 1
        if self._packer.is_full:
            self._cond.notify_all()
        elif len(self._open) == 1:
            self._cond.notify_all()  # the serving thread starts the timeout clock

    def _refuse(self) -> None:
        """A request did not fit the open batch: the batch is launched as soon as the model is free,
        and takes no further request after `lookahead + 1` refusals.

        While the previous batch runs, later requests may overtake the refused ones into this batch
        (they might fit); the refused ones head the queue, and the next batch, which starts empty,
        always takes the oldest: no request starves, and a batch passes over at most `lookahead`
        older requests."""
        self._refused += 1
        self._cond.notify_all()  # an idle serving thread launches the batch now

    # ---------------------------------------------------------------------------------- serving

    def _serve(self) -> None:
        taken = None
        try:
            while True:
                with self._cond:
                    taken = self._take()
                if taken is None:
                    return
                for call in self._calls(*taken):
                    with self._cond:
                        cancelling = self._cancelling
                    if cancelling:
                        self._fail(call[0], PoprtError(CANCELLED))
                    else:
                        self._run(*call)
                taken = None
        except BaseException as exc:  # a bug in the runner: fail everything rather than hang
            with self._cond:
                self._stopped = exc
                pending = (taken[0] if taken else []) + self._open + list(self._waiting)
                self._open, self._waiting = [], collections.deque()
            self._fail(pending, PoprtError(f"the PackRunner stopped: {one_line(exc)}"))
            raise

    def _take(self) -> tuple[list[_Request], np.ndarray, str] | None:
        """Wait for the open batch to be due; take it and open the next one (lock held)."""
        while True:
            if self._open:
                if self._refused or self._packer.is_full:
                    # a request that did not fit makes the batch due once the model is free:
                    # waiting for a fuller batch would leave the model idle
                    reason = "fullness"
                elif self._closing:
                    reason = "close"
                else:
                    remaining = self._open[0].arrived + self.timeout_microseconds / 1e6 - time.monotonic()
                    if remaining > 0:
                        self._cond.wait(remaining)
                        continue
                    reason = "timeout"
                requests, starts = self._open, self._packer.starts()
                running = np.array([r.future.set_running_or_notify_cancel() for r in requests])
                self._open, self._refused = [], 0
                self._packer.reset()
                self._refill()
                if not running.all():  # some were withdrawn: the batch runs without them
                    requests = [r for r, run in zip(requests, running) if run]
                    if not requests:
                        continue
                    lengths = np.array([r.length for r in requests])
                    starts = self._packer.without_gaps(starts[running], lengths)
                return requests, starts, reason
            if self._closing:
                return None
            self._cond.wait()

    def _calls(self, requests: list[_Request], starts: np.ndarray, reason: str) -> list[tuple[list[_Request], np.ndarray, str]]:
        """The model calls that run a taken batch (`offline.calls_of`): itself, or its length groups."""
        groups = calls_of(self._layout, [r.length for r in requests])
        if groups is None:
            return [(requests, starts, reason)]
        return [([requests[i] for i in group], placement.starts, reason) for group, placement in groups]

    def _run(self, requests: list[_Request], starts: np.ndarray, reason: str) -> None:
        """Build the packed feeds, run the model and hand each request its outputs."""
        placement = Placement.of([r.length for r in requests], starts)
        wanted = {name for r in requests for name in r.outputs}
        names = [name for name in self.interface.outputs if name in wanted]
        failed = 0
        slots = int(np.prod(self._layout.shape(placement)))
        started = time.monotonic()
        try:
            feeds = build_feeds(self.interface, self._layout, [r.tokens for r in requests], placement)
            results = dict(zip(names, self.session.run(names, feeds))) if names else {}
        except BaseException as exc:
            error = PoprtError(f"the batch of {len(requests)} requests holding this request failed: {one_line(exc)}")
            error.__cause__ = exc
            self._fail(requests, error)
            failed = len(requests)
        else:
            announce(BatchRun(len(requests), placement.tokens, slots, started, time.monotonic()), requests, self.batch_listeners)
            failed = self._deliver(requests, placement, results)
        with self._cond:
            counts = self._counts
            counts["batches"] += 1
            counts["requests"] += len(requests)
            counts["tokens"] += placement.tokens
            counts["token_slots"] += slots
            counts[f"batches_by_{reason}"] += 1
            counts["failed_requests"] += failed
            counts["failed_batches"] += failed == len(requests)

    def _deliver(self, requests: list[_Request], placement: Placement, results: dict) -> int:
        """Copy each request's share of every output into its arrays; complete the futures."""
        shares = split_outputs(self.interface, self._layout, results, placement)
        failed = 0
        for request, share in zip(requests, shares):
            try:
                for name, target in request.outputs.items():
                    if self.interface.outputs[name].layout.per_token:
                        target[: len(share[name])] = share[name]
                    else:
                        target[...] = share[name]
            except Exception as exc:  # the caller's array changed under us, or similar
                error = RequestError(f"copying this request's outputs failed: {one_line(exc)}")
                error.__cause__ = exc
                request.future.set_exception(error)
                failed += 1
            else:
                request.future.set_result(request.outputs)
        return failed

    @staticmethod
    def _fail(requests: list[_Request], error: BaseException) -> None:
        for request in requests:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # withdrawn, or done
                request.future.set_exception(error)


def announce(batch: BatchRun, requests, listeners: list[Callable[[BatchRun], None]]) -> None:
    """Tell each request's future and every listener about `batch` (before the futures complete)."""
    for request in requests:
        request.future.batch = batch
    for listener in listeners:
        try:
            listener(batch)
        except Exception:  # a listener's bug must not fail the batch it watches
            log.exception("a batch listener failed")
