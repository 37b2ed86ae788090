"""A dynamic batcher serving the original (unconverted) model: the dynamic-shape baseline.

This is what a CPU user runs without poprt-lite: the exported model with dynamic `[batch, sequence]`
inputs behind a server that batches concurrent requests the way Triton's dynamic batcher and
text-embeddings-inference's CPU backend do. One serving thread runs one batch at a time. When the
model is free it takes waiting requests oldest first, up to `max_batch` requests and (if set) a
batch of at most `max_tokens` token slots (`k x longest`, the padded batch TEI's budget counts): at
once when a batch is full, else when the oldest has waited `timeout_microseconds` (Triton's
`max_queue_delay_microseconds`; 0 is TEI's "no wait timer": whatever waits is taken). The batch is
padded to its longest request (`[k, longest]`, attention mask 1 on real tokens and 0 on padding),
run, and each request gets its real tokens of every per-token output and its row of every
`per_request` output. `max_batch=1` serves each request alone in arrival order (a server without
batching).

It checks nothing a PackRunner checks: callers pass well-formed requests (the benchmark's, or a
server's after `RequestChecker`). Futures and listeners are the PackRunner's (`PackFuture.batch`,
`batch_listeners`).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from poprt_lite.errors import PoprtError, one_line
from poprt_lite.runtime.layouts import PaddedRows
from poprt_lite.runtime.pack_runner import BatchRun, PackFuture, announce
from poprt_lite.vocab import Layout, Role


@dataclass(frozen=True)
class DynamicBatcherStats:
    batches: int
    requests: int
    tokens: int  # real tokens of the batches run
    token_slots: int  # k x longest per batch
    batches_by_timeout: int  # launched with fewer than max_batch requests

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.token_slots if self.token_slots else 0.0


class _Request:
    __slots__ = ("feeds", "outputs", "length", "arrived", "future")

    def __init__(self, feeds: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray], length: int) -> None:
        self.feeds, self.outputs, self.length = feeds, outputs, length
        self.arrived = time.monotonic()
        self.future = PackFuture()
        self.future.set_running_or_notify_cancel()
        self.future.queued = self.arrived


class DynamicBatcher:
    """Batches single unpadded requests onto a dynamic-shape onnxruntime session (see the module).

    `inputs`: the model's input name -> (role, dtype); every input but the attention mask is taken
    from the request's feeds (1-D, its own length). `outputs`: the outputs to run, per token
    unless named in `per_request` (one row per request, `[k, ...]`); each request's `outputs`
    dict names those it wants filled.
    """

    def __init__(
        self,
        session,
        inputs: Mapping[str, tuple[Role, np.dtype]],
        outputs: Sequence[str],
        max_batch: int,
        timeout_microseconds: int,
        *,
        max_tokens: int | None = None,
        per_request: Collection[str] = (),
    ) -> None:
        if max_batch < 1 or timeout_microseconds < 0 or (max_tokens is not None and max_tokens < 1):
            raise PoprtError(
                f"max_batch and max_tokens must be >= 1 and timeout_microseconds >= 0, got {max_batch}, "
                f"{max_tokens} and {timeout_microseconds}"
            )
        self.session, self.inputs, self.output_names = session, dict(inputs), list(outputs)
        self.max_batch, self.timeout, self.max_tokens = int(max_batch), timeout_microseconds / 1e6, max_tokens
        self.per_request = frozenset(per_request)
        self.batch_listeners: list[Callable[[BatchRun], None]] = []
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._counts: collections.Counter = collections.Counter()
        self._thread = threading.Thread(target=self._serve, name="poprt-lite-dynamic-batcher", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> DynamicBatcherStats:
        with self._cond:
            counts = dict(self._counts)
        return DynamicBatcherStats(**{f: counts.get(f, 0) for f in DynamicBatcherStats.__dataclass_fields__})

    @property
    def pending(self) -> int:
        """Requests queued and not yet running."""
        with self._cond:
            return len(self._queue)

    def execute_async(self, feeds: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray]) -> PackFuture:
        length = next(len(feeds[name]) for name, (role, _) in self.inputs.items() if role is Role.dynamic_input)
        request = _Request(feeds, outputs, length)
        with self._cond:
            if self._closing:
                raise PoprtError("the DynamicBatcher is closed; create a new one")
            self._queue.append(request)
            if len(self._queue) == 1 or len(self._queue) == self.max_batch:
                self._cond.notify_all()
        return request.future

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the serving thread (waiting up to `timeout` seconds)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- serving

    def _due(self) -> int:
        """How many of the oldest waiting requests make a full batch (lock held; 0: not full yet)."""
        longest = 0
        for k, request in enumerate(self._queue):
            if k == self.max_batch:
                return k
            longest = max(longest, request.length)
            if self.max_tokens is not None and k and (k + 1) * longest > self.max_tokens:
                return k
        return len(self._queue) if len(self._queue) == self.max_batch else 0

    def _take(self) -> tuple[list[_Request], bool] | None:
        """Wait until a batch is due and take it (lock held): (requests, launched by timeout)."""
        while True:
            full = self._due()
            if full:
                return [self._queue.popleft() for _ in range(full)], False
            if self._queue:
                remaining = self._queue[0].arrived + self.timeout - time.monotonic()
                if remaining <= 0 or self._closing:
                    return [self._queue.popleft() for _ in range(len(self._queue))], True
                self._cond.wait(remaining)
            elif self._closing:
                return None
            else:
                self._cond.wait()

    def _serve(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
            if taken is None:
                return
            requests, by_timeout = taken
            try:
                batch = self._run(requests)
            except BaseException as exc:
                error = PoprtError(f"the batch of {len(requests)} requests holding this request failed: {one_line(exc)}")
                for request in requests:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            with self._cond:  # counted before the futures complete, so a finished client sees its batch
                self._counts["batches"] += 1
                self._counts["requests"] += len(requests)
                self._counts["tokens"] += batch.tokens
                self._counts["token_slots"] += batch.token_slots
                self._counts["batches_by_timeout"] += by_timeout
            announce(batch, requests, self.batch_listeners)
            for request in requests:
                request.future.set_result(request.outputs)

    def _run(self, requests: list[_Request]) -> BatchRun:
        """Pad, run and copy each request's share of the outputs into its arrays."""
        lengths = [r.length for r in requests]
        layout = PaddedRows(len(requests), max(lengths))
        placement = layout.placement(lengths)
        feeds = {}
        for name, (role, dtype) in self.inputs.items():
            if role is Role.attention_mask:
                feeds[name] = layout.mask(placement, dtype)
            else:
                feeds[name] = layout.scatter(placement, np.concatenate([r.feeds[name] for r in requests]), dtype)
        started = time.monotonic()
        results = self.session.run(self.output_names, feeds)
        batch = BatchRun(len(requests), sum(lengths), len(requests) * max(lengths), started, time.monotonic())
        for name, out in zip(self.output_names, results, strict=True):
            pooled = name in self.per_request
            shares = out if pooled else layout.split(out, Layout.padded, placement)
            for request, share in zip(requests, shares, strict=True):
                target = request.outputs.get(name)  # a request may want some of the outputs only
                if target is not None:
                    target[... if pooled else slice(len(share))] = share
        return batch
