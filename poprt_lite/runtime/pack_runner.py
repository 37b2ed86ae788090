"""PackRunner: online packing of single requests into the fixed batches of a packed artifact.

Clients call `execute_async(feeds, outputs)` with one unpadded request (its own `input_ids`, ...)
and get a future; `execute` blocks until the request's `outputs` arrays are filled. Requests are
placed, in arrival order, into the open batch by an `OnlinePacker` (first_fit / next_fit over rows
in AttentionMask mode; one stream of `batch_size * seq_len` tokens in unpack/repack mode). A
request that does not fit waits for the next batch. A background thread launches the open batch
when the model is free and the batch is full (a request did not fit, or it holds `max_valid_num`
requests, or no token slot is left), or when its oldest request has waited `timeout_microseconds`.
While the previous batch still runs, later requests may fill the room a refused request left, until
`lookahead + 1` requests have not fitted. The thread builds the packed feeds with numpy, runs the
model, copies each request's slice of every output into the caller's arrays and completes the
futures. The next batch takes the waiting requests oldest first.

Feeds of a request (1-D `[n]` or `[1, n]`, int32 or int64 for integer inputs):
- the dynamic input (`input_ids`): required, 1 <= n <= segment_max_size (and seq_len);
- `token_type_ids`: optional, zeros when omitted;
- `position_ids`: optional, `position_offset + arange(n)` when omitted (the manifest's offset, e.g. 2
  for RoBERTa-like models); used as given otherwise;
- `attention_mask`: optional; must be numeric and all non-zero (requests are unpadded); the runner
  builds the packed mask itself (1/0 in unpack/repack mode, segment ids 1, 2, ... per row in AttentionMask mode);
- `unpack_info` (unpack/repack artifacts only): optional and ignored; the runner fills it.
Any other model input ("data" role) is per token and required; float ones must be finite.

Every request is checked in the caller's thread, before it is queued, so that a bad request can
only fail its own call, never the batch it would share with others: ids must lie in `[0, rows)` of
the embedding tables they index (the manifest's `vocab_size` for the dynamic input; the tables'
sizes, read from the graph, for token types and positions), since an out-of-table id makes
onnxruntime fail the whole batch; and no float value may be NaN or infinite, since attention mixes
tokens of different requests with zero weights and 0 * NaN is NaN.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from poprt_lite.artifact import Artifact, load_artifact
from poprt_lite.errors import PoprtError, QueueFullError, RequestError, one_line
from poprt_lite.runtime.model_runner import cast_ids
from poprt_lite.runtime.config import DEFAULT_TIMEOUT_MICROSECONDS, PackRunnerConfig
from poprt_lite.runtime.interface import PackedInterface, read_packed_interface
from poprt_lite.runtime.layouts import Placement
from poprt_lite.runtime.packing import OnlinePacker, PackAlgorithm
from poprt_lite.vocab import ID_ROLES, Layout, PackMode, Role


class PackFuture(concurrent.futures.Future):
    """The pending result of one request: a `concurrent.futures.Future` with PopRT's `wait()`.

    `result()` returns the request's `outputs` dict once it is filled (or raises the request's
    error); `exception()` returns the error or None; `done()` tells without blocking.
    """

    def wait(self, timeout: float | None = None) -> None:
        """Block until the request's outputs are filled; raise its error if it failed.

        Raises `concurrent.futures.TimeoutError` (the builtin TimeoutError) if `timeout` seconds pass.
        """
        self.result(timeout)


@dataclass(frozen=True)
class PackRunnerStats:
    """Counters of a PackRunner since it started (a snapshot)."""

    batches: int  # batches run (including failed ones)
    requests: int  # requests in those batches
    tokens: int  # real tokens in those batches
    token_slots: int  # batch_size * seq_len per batch
    batches_by_fullness: int  # launched because no further request fitted
    batches_by_timeout: int  # launched because the oldest request waited timeout_microseconds
    batches_by_close: int  # launched early to drain the runner on close()
    failed_batches: int
    failed_requests: int  # requests whose future holds an error (failed batch or output copy)
    overtakes: int  # requests placed ahead of an older one that did not fit (the lookahead at work)

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


@dataclass(frozen=True)
class Batching:
    """How a PackRunner forms batches: the config's fields, settled against the artifact."""

    algorithm: PackAlgorithm
    lookahead: int
    max_pending: int | None
    timeout_microseconds: float


def resolve_batching(config: PackRunnerConfig, interface: PackedInterface) -> Batching:
    """Check the config against the artifact (a set field must agree with it) and settle defaults."""
    path, inputs = interface.path, interface.input_roles
    name = config.dynamic_input_name
    if name is not None and name != interface.dynamic_input:
        if name not in inputs:
            raise PoprtError(
                f"dynamic_input_name '{name}' is not an input of the model; its inputs are: {', '.join(inputs)}"
            )
        raise PoprtError(
            f"dynamic_input_name '{name}' contradicts the artifact, whose "
            f"dynamic input is '{interface.dynamic_input}'; leave it unset"
        )
    mask_name = interface.mask[0] if interface.mask else None
    for name in config.single_row_inputs:
        if interface.mode is not PackMode.attention_mask:
            raise PoprtError(
                f"enable_input_single_row_mode('{name}') asks for AttentionMask mode, but artifact "
                f"'{path}' was compiled for {interface.mode} mode; drop that call or compile with "
                "--pack_args mode=attention_mask"
            )
        if name != mask_name:
            raise PoprtError(
                f"enable_input_single_row_mode('{name}'): the model's attention-mask input is '{mask_name}'"
            )
    if config.max_valid_num is not None and config.max_valid_num != interface.max_valid_num:
        raise PoprtError(
            f"max_valid_num={config.max_valid_num} contradicts the artifact, compiled with "
            f"max_valid_num={interface.max_valid_num}; leave it unset or recompile"
        )
    timeout = config.timeout_microseconds
    return Batching(
        algorithm=PackAlgorithm.parse(config.algorithm),
        lookahead=config.lookahead,
        max_pending=config.max_pending,
        timeout_microseconds=DEFAULT_TIMEOUT_MICROSECONDS if timeout is None else timeout,
    )


class _Request:
    __slots__ = ("length", "tokens", "outputs", "future", "arrived")

    def __init__(self, length: int, tokens: dict, outputs: dict, arrived: float) -> None:
        self.length = length
        self.tokens = tokens  # token input name -> [n, ...] array of the model's dtype
        self.outputs = outputs  # output name -> caller's array
        self.future = PackFuture()
        self.future.set_running_or_notify_cancel()  # a queued request cannot be cancelled
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:
            # onnxruntime's worker threads spin after each run by default, taking the cores from the
            # client threads and the serving thread between batches (measured up to 2x slower on
            # 2 cores); a PackRunner runs its session without spinning unless asked.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(self.artifact.model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PoprtError(f"onnxruntime cannot load artifact '{self.artifact.path}': {one_line(exc)}") from exc
        across_rows = self._layout.across_rows
        self._packer = OnlinePacker(
            self.batching.algorithm,
            self.batch_size,
            self.seq_len,
            self.max_valid_num,
            across_rows,
            segment_max_size=self.segment_max_size if across_rows else None,
        )
        self._cond = threading.Condition()
        self._open: list[_Request] = []  # requests in the batch being filled
        self._refused = 0  # requests that did not fit the open batch (they wait in _waiting)
        self._waiting: collections.deque[_Request] = collections.deque()  # for later batches
        self._closing = False
        self._stopped: BaseException | None = None  # the serving thread died of this
        self._counts = collections.Counter()
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

    def execute_async(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray] | None = None) -> PackFuture:
        """Queue one request and return its future. The request is checked here: a bad one raises
        RequestError on this call and nothing is queued. With `outputs=None` the runner allocates
        `[n, ...]` arrays for every output (returned by `future.result()`). With `max_pending` set
        and that many requests waiting, raises QueueFullError and queues nothing."""
        request = self._prepare(feeds, outputs)
        with self._cond:
            if self._closing or self._stopped is not None:
                reason = f" (it stopped: {one_line(self._stopped)})" if self._stopped else ""
                raise PoprtError(f"the PackRunner is closed{reason}; create a new one")
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
        or, with `cancel_pending`, failed with PoprtError. Waits up to `timeout` seconds (default:
        until the batch being run, if any, finishes) for the serving thread. Idempotent."""
        cancelled: list[_Request] = []
        with self._cond:
            if not self._closing:
                self._closing = True
                if cancel_pending:
                    cancelled = self._open + list(self._waiting)
                    self._open, self._waiting = [], collections.deque()
                    self._packer.reset()
                    self._refused = 0
                self._cond.notify_all()
        self._fail(cancelled, PoprtError("the PackRunner was closed before this request ran"))
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

    # --------------------------------------------------------------------------------- requests

    def _prepare(self, feeds: Mapping[str, Any], outputs: dict[str, np.ndarray] | None) -> _Request:
        """Check one request and convert its feeds to the model's dtypes (in the caller's thread)."""
        if not isinstance(feeds, Mapping):
            raise RequestError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        for name in feeds:
            if name not in self.inputs:
                raise RequestError(
                    f"unexpected feed '{name}'; a request takes: {', '.join(self._describe_feeds())}"
                )
        if self.dynamic_input_name not in feeds:
            raise RequestError(
                f"missing feed '{self.dynamic_input_name}'; a request takes: {', '.join(self._describe_feeds())}"
            )
        io = self.interface
        ids = self._token_feed(io.dynamic_input, feeds[io.dynamic_input], None)
        n = len(ids)
        if n == 0:
            raise RequestError(f"the request is empty (feed '{io.dynamic_input}' has 0 tokens)")
        if n > io.max_length:
            limit = "segment_max_size" if io.max_length == io.segment_max_size else "seq_len"
            raise RequestError(
                f"the request has {n} tokens, more than {limit} {io.max_length} of the artifact; "
                "truncate or split it"
            )
        if io.vocab_size and ids.max() >= io.vocab_size:
            raise RequestError(f"feed '{io.dynamic_input}' has ids >= the vocabulary size {io.vocab_size}")
        tokens = {io.dynamic_input: ids}
        for name, token_input in io.token_inputs.items():
            if name == io.dynamic_input:
                continue
            if name in feeds:
                tokens[name] = self._token_feed(name, feeds[name], n)
            elif token_input.role is Role.token_type_ids:
                tokens[name] = np.zeros(n, token_input.dtype)
            elif token_input.role is Role.position_ids:
                tokens[name] = np.arange(io.position_offset, io.position_offset + n, dtype=token_input.dtype)
            else:
                raise RequestError(f"missing feed '{name}'; a request takes: {', '.join(self._describe_feeds())}")
        if io.mask is not None and io.mask[0] in feeds:
            mask_name, mask_dtype = io.mask
            mask = _as_tokens(mask_name, feeds[mask_name], ())
            if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
                raise RequestError(f"feed '{mask_name}' has dtype {mask.dtype.name}; the model expects {mask_dtype.name}")
            if np.issubdtype(mask.dtype, np.inexact) and not np.isfinite(mask).all():
                raise RequestError(f"feed '{mask_name}' has NaN or infinite values")
            if len(mask) != n:
                raise RequestError(f"feed '{mask_name}' has {len(mask)} tokens; '{io.dynamic_input}' has {n}")
            if not np.all(mask):
                raise RequestError(f"feed '{mask_name}' has zeros; send each request unpadded (its real tokens only)")
        if io.unpack_info is not None and io.unpack_info[0] in feeds:
            info = _array(io.unpack_info[0], feeds[io.unpack_info[0]])
            if info.ndim > 1 or not np.issubdtype(info.dtype, np.integer):
                raise RequestError(
                    f"feed '{io.unpack_info[0]}' must be a 1-D integer array (it is ignored: the runner fills it)"
                )
        return _Request(n, tokens, self._output_arrays(outputs, n), time.monotonic())

    def _token_feed(self, name: str, value: Any, n: int | None) -> np.ndarray:
        role, dtype, trailing = (getattr(self.interface.token_inputs[name], f) for f in ("role", "dtype", "trailing"))
        array = _as_tokens(name, value, trailing)
        if n is not None and len(array) != n:
            raise RequestError(f"feed '{name}' has {len(array)} tokens; '{self.dynamic_input_name}' has {n}")
        if array.dtype != dtype:
            if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.integer):
                array = cast_ids(name, array, dtype)
            elif np.issubdtype(dtype, np.floating) and np.issubdtype(array.dtype, np.floating):
                with np.errstate(over="ignore"):  # values beyond the model's type become inf: refused below
                    array = array.astype(dtype)
            else:
                raise RequestError(f"feed '{name}' has dtype {array.dtype.name}; the model expects {dtype.name}")
        if role in ID_ROLES and array.size and array.min() < 0:
            raise RequestError(f"feed '{name}' has negative values")
        id_rows = self.interface.id_rows
        if name in id_rows and array.size and array.max() >= id_rows[name]:
            raise RequestError(
                f"feed '{name}' has ids >= {id_rows[name]}, the number of rows of the embedding table it indexes"
            )
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise RequestError(f"feed '{name}' has NaN or infinite values")
        return array

    def _output_arrays(self, outputs: dict[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
        """The arrays a request's outputs are copied into: the caller's, checked, or (None) new
        `[n, ...]` / `[...]` arrays for every output."""
        specs = self.interface.outputs
        if outputs is None:
            return {
                name: np.zeros((n, *out.trailing) if out.layout.per_token else out.trailing, out.dtype)
                for name, out in specs.items()
            }
        if not isinstance(outputs, Mapping):
            raise RequestError(f"outputs must be a dict of output name -> array, got {type(outputs).__name__}")
        for name, target in outputs.items():
            if name not in specs:
                raise RequestError(f"model has no output '{name}'; outputs are: {', '.join(specs)}")
            out = specs[name]
            trailing = out.trailing
            if not isinstance(target, np.ndarray):
                raise RequestError(f"output '{name}' must be a numpy array, got {type(target).__name__}")
            if not target.flags.writeable:
                raise RequestError(f"output array '{name}' is read-only")
            if not np.can_cast(out.dtype, target.dtype, casting="same_kind"):
                raise RequestError(f"output array '{name}' has dtype {target.dtype.name}; the model gives {out.dtype.name}")
            if out.layout.per_token:
                ok = target.ndim == 1 + len(trailing) and target.shape[0] >= n and _fits(target.shape[1:], trailing)
                want = f"[>={n}{''.join(f', {d}' for d in trailing)}] (e.g. [max_seq_len{''.join(f', {d}' for d in trailing)}])"
            else:
                ok = target.ndim == len(trailing) and _fits(target.shape, trailing)
                want = f"[{', '.join(map(str, trailing))}] (one per request)"
            if not ok:
                raise RequestError(f"output array '{name}' has shape {list(target.shape)}; it must be {want}")
        return outputs if isinstance(outputs, dict) else dict(outputs)

    def _describe_feeds(self) -> list[str]:
        described = []
        for name, role in self.interface.input_roles.items():
            if role is Role.unpack_info:
                described.append(f"{name} (optional, ignored)")
            else:
                described.append(f"{name} (optional)" if self.interface.is_optional(name) else name)
        return described

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
        """Fill the (empty) open batch from the waiting requests, oldest first (lock held).

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
                self._run(*taken)
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
                self._open, self._refused = [], 0
                self._packer.reset()
                self._refill()
                return requests, starts, reason
            if self._closing:
                return None
            self._cond.wait()

    def _run(self, requests: list[_Request], starts: np.ndarray, reason: str) -> None:
        """Build the packed feeds, run the model and hand each request its outputs."""
        placement = Placement.of([r.length for r in requests], starts)
        wanted = {name for r in requests for name in r.outputs}
        names = [name for name in self.interface.outputs if name in wanted]
        failed = 0
        try:
            feeds = self._build_feeds(requests, placement)
            results = dict(zip(names, self.session.run(names, feeds))) if names else {}
        except BaseException as exc:
            error = PoprtError(f"the batch of {len(requests)} requests holding this request failed: {one_line(exc)}")
            error.__cause__ = exc
            self._fail(requests, error)
            failed = len(requests)
        else:
            failed = self._deliver(requests, placement, results)
        with self._cond:
            counts = self._counts
            counts["batches"] += 1
            counts["requests"] += len(requests)
            counts["tokens"] += placement.tokens
            counts["token_slots"] += self.batch_size * self.seq_len
            counts[f"batches_by_{reason}"] += 1
            counts["failed_requests"] += failed
            counts["failed_batches"] += failed == len(requests)

    def _build_feeds(self, requests: list[_Request], placement: Placement) -> dict[str, np.ndarray]:
        """Lay the requests' tokens out in one batch, as the artifact's layout says."""
        io, layout = self.interface, self._layout
        feeds = {
            name: layout.scatter(placement, np.concatenate([r.tokens[name] for r in requests]), token_input.dtype)
            for name, token_input in io.token_inputs.items()
        }
        if io.mask is not None:
            feeds[io.mask[0]] = layout.mask(placement, io.mask[1])
        if io.unpack_info is not None:
            feeds[io.unpack_info[0]] = layout.unpack_info(placement, io.unpack_info[1])
        return feeds

    def _deliver(self, requests: list[_Request], placement: Placement, results: dict) -> int:
        """Copy each request's share of every output into its arrays; complete the futures."""
        shares = {
            name: self._layout.split(out, self.interface.outputs[name].layout, placement) for name, out in results.items()
        }
        failed = 0
        for i, request in enumerate(requests):
            try:
                for name, target in request.outputs.items():
                    share = shares[name][i]
                    if self.interface.outputs[name].layout.per_token:
                        target[: len(share)] = share
                    else:
                        target[...] = share
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
            if not request.future.done():
                request.future.set_exception(error)


def _as_tokens(name: str, value: Any, trailing: tuple) -> np.ndarray:
    """A request's feed as `[n, *trailing]`, accepting a leading batch axis of 1."""
    array = _array(name, value)
    if array.ndim == len(trailing) + 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != len(trailing) + 1 or not _fits(array.shape[1:], trailing):
        want = "[n" + "".join(f", {d}" for d in trailing) + "]"
        raise RequestError(f"feed '{name}' has shape {list(array.shape)}; a request's '{name}' is {want} or [1, {want[1:]}")
    return array


def _array(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # a ragged list, or an object numpy cannot convert
        raise RequestError(f"feed '{name}' is a ragged or non-numeric sequence; pass a numpy array") from None



def _fits(shape: tuple, dims: tuple) -> bool:
    return len(shape) == len(dims) and all(not isinstance(d, int) or d == s for s, d in zip(shape, dims))

