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
from poprt_lite.errors import PoprtError, QueueFullError, RequestError
from poprt_lite.runtime.model_runner import cast_ids
from poprt_lite.runtime.config import DEFAULT_TIMEOUT_MICROSECONDS, PackRunnerConfig
from poprt_lite.runtime.packing import OnlinePacker, PackAlgorithm, segment_ids

TOKEN_ROLES = ("dynamic_input", "token_type_ids", "position_ids", "data")
OPTIONAL_ROLES = ("token_type_ids", "position_ids", "attention_mask", "unpack_info")
ID_ROLES = ("dynamic_input", "token_type_ids", "position_ids")
TOKEN_LAYOUTS = ("unpacked", "packed")
LAYOUTS = (*TOKEN_LAYOUTS, "per_request")


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
        config.validated()
        self.artifact = source if isinstance(source, Artifact) else load_artifact(source)
        self.manifest = self.artifact.manifest
        self.inputs = {spec["name"]: spec for spec in self.manifest["inputs"]}
        self.outputs = {spec["name"]: spec for spec in self.manifest["outputs"]}
        self._resolve(config)
        self._check_tables()
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
            raise PoprtError(f"onnxruntime cannot load artifact '{self.artifact.path}': {_one_line(exc)}") from exc
        self._packer = OnlinePacker(
            self.algorithm,
            self.batch_size,
            self.seq_len,
            self.max_valid_num,
            self.mode == "unpack_repack",
            segment_max_size=self.segment_max_size if self.mode == "unpack_repack" else None,
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

    # ----------------------------------------------------------------------------- configuration

    def _resolve(self, config: PackRunnerConfig) -> None:
        """Settle the batching parameters from the manifest and check the config against them."""
        path = self.artifact.path
        pack = self.manifest.get("pack")
        if not pack:
            raise PoprtError(
                f"artifact '{path}' is not packed (compiled without --pack_args); run it with "
                "runtime.Runner(path) and no PackRunnerConfig"
            )
        self.mode = pack["mode"]
        if self.mode not in ("unpack_repack", "attention_mask"):
            raise PoprtError(f"artifact '{path}' has unknown pack mode '{self.mode}'; re-export it")
        self.segment_max_size = int(pack["segment_max_size"])
        self.position_offset = int(self.manifest.get("position_offset") or 0)
        self.vocab_size = self.manifest.get("vocab_size")
        inputs = self.inputs
        by_role = collections.defaultdict(list)
        for spec in inputs.values():
            by_role[spec.get("role", "data")].append(spec["name"])

        dynamic = by_role["dynamic_input"]
        if len(dynamic) != 1:
            raise PoprtError(f"artifact '{path}' has {len(dynamic)} dynamic inputs; a packed model has exactly one")
        self.dynamic_input_name = dynamic[0]
        if config.dynamic_input_name is not None and config.dynamic_input_name != self.dynamic_input_name:
            if config.dynamic_input_name not in inputs:
                raise PoprtError(
                    f"dynamic_input_name '{config.dynamic_input_name}' is not an input of the model; "
                    f"its inputs are: {', '.join(inputs)}"
                )
            raise PoprtError(
                f"dynamic_input_name '{config.dynamic_input_name}' contradicts the artifact, whose "
                f"dynamic input is '{self.dynamic_input_name}'; leave it unset"
            )
        shape = inputs[self.dynamic_input_name]["shape"]
        if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise PoprtError(
                f"input '{self.dynamic_input_name}' has shape {shape}; a packed artifact has a static "
                "[batch, seq_len] shape (compile with --input_shape)"
            )
        self.batch_size, self.seq_len = shape

        masks = by_role["attention_mask"]
        self.mask_name = masks[0] if masks else None
        for name in config.single_row_inputs:
            if self.mode != "attention_mask":
                raise PoprtError(
                    f"enable_input_single_row_mode('{name}') asks for AttentionMask mode, but artifact "
                    f"'{path}' was compiled for unpack_repack mode; drop that call or compile with "
                    "--pack_args mode=attention_mask"
                )
            if name != self.mask_name:
                raise PoprtError(
                    f"enable_input_single_row_mode('{name}'): the model's attention-mask input is "
                    f"'{self.mask_name}'"
                )

        self.max_valid_num = int(pack["max_valid_num"])
        if config.max_valid_num is not None and config.max_valid_num != self.max_valid_num:
            raise PoprtError(
                f"max_valid_num={config.max_valid_num} contradicts the artifact, compiled with "
                f"max_valid_num={self.max_valid_num}; leave it unset or recompile"
            )
        self.algorithm = PackAlgorithm.parse(config.algorithm)
        self.lookahead = config.lookahead
        self.max_pending = config.max_pending
        timeout = config.timeout_microseconds
        self.timeout_microseconds = DEFAULT_TIMEOUT_MICROSECONDS if timeout is None else timeout
        self._timeout = self.timeout_microseconds / 1e6
        self.max_length = min(self.segment_max_size, self.seq_len if self.mode == "attention_mask" else self.segment_max_size)
        if self.mode == "unpack_repack" and self.segment_max_size > self.batch_size * self.seq_len:
            raise PoprtError(
                f"artifact '{path}': segment_max_size {self.segment_max_size} exceeds the batch of "
                f"{self.batch_size}x{self.seq_len} tokens; recompile"
            )

        # Inputs: per-token ones ([B, S, ...]), the mask, unpack_info ([N]).
        self._token_inputs: dict[str, tuple[str, np.dtype, tuple]] = {}  # name -> (role, dtype, trailing)
        self._unpack_info = None
        for name, spec in inputs.items():
            role, dtype, dims = spec.get("role", "data"), np.dtype(spec["dtype"]), spec["shape"]
            if role in TOKEN_ROLES:
                if len(dims) < 2 or dims[:2] != [self.batch_size, self.seq_len] or not _static(dims[2:]):
                    raise PoprtError(
                        f"input '{name}' has shape {dims}; a packed model's per-token inputs are "
                        f"[{self.batch_size}, {self.seq_len}, ...] with static dims"
                    )
                if role in ID_ROLES and (len(dims) != 2 or not np.issubdtype(dtype, np.integer)):
                    raise PoprtError(f"input '{name}' ({role}) must be an integer [batch, seq_len] tensor; it is {dtype.name} {dims}")
                self._token_inputs[name] = (role, dtype, tuple(dims[2:]))
            elif role == "attention_mask":
                if name != self.mask_name:
                    raise PoprtError(f"artifact '{path}' has several attention-mask inputs; a packed model has one")
                if dims != [self.batch_size, self.seq_len]:
                    raise PoprtError(f"input '{name}' has shape {dims}; expected [{self.batch_size}, {self.seq_len}]")
            elif role == "unpack_info":
                if dims != [self.max_valid_num] or not np.issubdtype(dtype, np.integer):
                    raise PoprtError(f"input '{name}' has shape {dims}; unpack_info is an integer [{self.max_valid_num}]")
                self._unpack_info = (name, dtype)
            else:
                raise PoprtError(f"input '{name}' has role '{role}', which a PackRunner cannot fill")
        self._optional = {
            name
            for name, spec in inputs.items()
            if spec.get("role") in OPTIONAL_ROLES
        }

        # Outputs: name -> (layout, trailing dims of one token / one request).
        self._output_specs: dict[str, tuple[str, tuple]] = {}
        lead = {
            "unpacked": [self.max_valid_num, self.segment_max_size],
            "packed": [self.batch_size, self.seq_len],
            "per_request": [self.max_valid_num],
        }
        for name, spec in self.outputs.items():
            layout, dims = spec.get("layout", "padded"), spec["shape"]
            if layout not in LAYOUTS:
                raise PoprtError(
                    f"output '{name}' has layout '{layout}', which a PackRunner cannot split per request; "
                    "recompile with --pack_args"
                )
            head = lead[layout]
            if len(dims) < len(head) or any(isinstance(d, int) and d != h for d, h in zip(dims, head)):
                raise PoprtError(f"output '{name}' ({layout}) has shape {dims}; expected [{', '.join(map(str, head))}, ...]")
            self._output_specs[name] = (layout, tuple(dims[len(head):]))
        self._dynamic_dtype = self._token_inputs[self.dynamic_input_name][1]

    def _check_tables(self) -> None:
        """Bound the id inputs by the embedding tables they index, so that a request with an
        out-of-table id is refused on its call instead of failing the batch it would share."""
        rows = {
            name: self.inputs[name]["table_rows"]
            for name, (role, _, _) in self._token_inputs.items()
            if role in ID_ROLES and self.inputs[name].get("table_rows")
        }
        if not self.vocab_size and self.dynamic_input_name in rows:
            self.vocab_size = rows[self.dynamic_input_name]
        self._id_rows = {name: n for name, n in rows.items() if name != self.dynamic_input_name}
        for name, (role, _, _) in self._token_inputs.items():
            last = self.position_offset + self.max_length - 1
            if role == "position_ids" and name in self._id_rows and last >= self._id_rows[name]:
                raise PoprtError(
                    f"artifact '{self.artifact.path}': requests of up to {self.max_length} tokens need position "
                    f"ids up to {last}, but '{name}' indexes a table of {self._id_rows[name]} rows; recompile "
                    "with a smaller segment_max_size"
                )

    # ------------------------------------------------------------------------------- public API

    @property
    def output_names(self) -> list[str]:
        return list(self._output_specs)

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
                reason = f" (it stopped: {_one_line(self._stopped)})" if self._stopped else ""
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
        ids = self._token_feed(self.dynamic_input_name, feeds[self.dynamic_input_name], None)
        n = len(ids)
        if n == 0:
            raise RequestError(f"the request is empty (feed '{self.dynamic_input_name}' has 0 tokens)")
        if n > self.max_length:
            limit = "segment_max_size" if self.max_length == self.segment_max_size else "seq_len"
            raise RequestError(
                f"the request has {n} tokens, more than {limit} {self.max_length} of the artifact; "
                "truncate or split it"
            )
        if self.vocab_size and ids.max() >= self.vocab_size:
            raise RequestError(f"feed '{self.dynamic_input_name}' has ids >= the vocabulary size {self.vocab_size}")
        tokens = {self.dynamic_input_name: ids}
        for name, (role, dtype, trailing) in self._token_inputs.items():
            if name == self.dynamic_input_name:
                continue
            if name in feeds:
                tokens[name] = self._token_feed(name, feeds[name], n)
            elif role == "token_type_ids":
                tokens[name] = np.zeros(n, dtype)
            elif role == "position_ids":
                tokens[name] = np.arange(self.position_offset, self.position_offset + n, dtype=dtype)
            else:
                raise RequestError(f"missing feed '{name}'; a request takes: {', '.join(self._describe_feeds())}")
        if self.mask_name is not None and self.mask_name in feeds:
            mask = _as_tokens(self.mask_name, feeds[self.mask_name], ())
            if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
                want = np.dtype(self.inputs[self.mask_name]["dtype"]).name
                raise RequestError(f"feed '{self.mask_name}' has dtype {mask.dtype.name}; the model expects {want}")
            if np.issubdtype(mask.dtype, np.inexact) and not np.isfinite(mask).all():
                raise RequestError(f"feed '{self.mask_name}' has NaN or infinite values")
            if len(mask) != n:
                raise RequestError(f"feed '{self.mask_name}' has {len(mask)} tokens; '{self.dynamic_input_name}' has {n}")
            if not np.all(mask):
                raise RequestError(
                    f"feed '{self.mask_name}' has zeros; send each request unpadded (its real tokens only)"
                )
        if self._unpack_info is not None and self._unpack_info[0] in feeds:
            info = _array(self._unpack_info[0], feeds[self._unpack_info[0]])
            if info.ndim > 1 or not np.issubdtype(info.dtype, np.integer):
                raise RequestError(
                    f"feed '{self._unpack_info[0]}' must be a 1-D integer array (it is ignored: the runner fills it)"
                )
        return _Request(n, tokens, self._check_outputs(outputs, n), time.monotonic())

    def _token_feed(self, name: str, value: Any, n: int | None) -> np.ndarray:
        role, dtype, trailing = self._token_inputs[name]
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
        if name in self._id_rows and array.size and array.max() >= self._id_rows[name]:
            raise RequestError(
                f"feed '{name}' has ids >= {self._id_rows[name]}, the number of rows of the embedding table it indexes"
            )
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise RequestError(f"feed '{name}' has NaN or infinite values")
        return array

    def _check_outputs(self, outputs: dict[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
        if outputs is None:
            return {
                name: np.zeros(
                    (n, *trailing) if layout in TOKEN_LAYOUTS else trailing,
                    np.dtype(self.outputs[name]["dtype"]),
                )
                for name, (layout, trailing) in self._output_specs.items()
            }
        if not isinstance(outputs, Mapping):
            raise RequestError(f"outputs must be a dict of output name -> array, got {type(outputs).__name__}")
        for name, target in outputs.items():
            if name not in self._output_specs:
                raise RequestError(f"model has no output '{name}'; outputs are: {', '.join(self._output_specs)}")
            layout, trailing = self._output_specs[name]
            if not isinstance(target, np.ndarray):
                raise RequestError(f"output '{name}' must be a numpy array, got {type(target).__name__}")
            if not target.flags.writeable:
                raise RequestError(f"output array '{name}' is read-only")
            dtype = np.dtype(self.outputs[name]["dtype"])
            if not np.can_cast(dtype, target.dtype, casting="same_kind"):
                raise RequestError(f"output array '{name}' has dtype {target.dtype.name}; the model gives {dtype.name}")
            if layout in TOKEN_LAYOUTS:
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
        for name in self.inputs:
            role = self.inputs[name].get("role")
            described.append(f"{name} (optional)" if name in self._optional else name)
            if role == "unpack_info":
                described[-1] = f"{name} (optional, ignored)"
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
            self._fail(pending, PoprtError(f"the PackRunner stopped: {_one_line(exc)}"))
            raise

    def _take(self) -> tuple[list[_Request], list, str] | None:
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
                    remaining = self._open[0].arrived + self._timeout - time.monotonic()
                    if remaining > 0:
                        self._cond.wait(remaining)
                        continue
                    reason = "timeout"
                requests, placements = self._open, self._packer.placements()
                self._open, self._refused = [], 0
                self._packer.reset()
                self._refill()
                return requests, placements, reason
            if self._closing:
                return None
            self._cond.wait()

    def _run(self, requests: list[_Request], placements: list, reason: str) -> None:
        """Build the packed feeds, run the model and hand each request its outputs."""
        lengths = np.fromiter((r.length for r in requests), np.int64, len(requests))
        if self.mode == "unpack_repack":
            starts = np.asarray(placements, np.int64)
        else:
            rows, offsets = np.asarray(placements, np.int64).reshape(-1, 2).T
            starts = rows * self.seq_len + offsets
        wanted = {name for r in requests for name in r.outputs}
        names = [name for name in self._output_specs if name in wanted]
        failed = 0
        try:
            feeds = self._build_feeds(requests, lengths, starts)
            results = dict(zip(names, self.session.run(names, feeds))) if names else {}
        except BaseException as exc:
            error = PoprtError(f"the batch of {len(requests)} requests holding this request failed: {_one_line(exc)}")
            error.__cause__ = exc
            self._fail(requests, error)
            failed = len(requests)
        else:
            failed = self._deliver(requests, lengths, starts, results)
        with self._cond:
            counts = self._counts
            counts["batches"] += 1
            counts["requests"] += len(requests)
            counts["tokens"] += int(lengths.sum())
            counts["token_slots"] += self.batch_size * self.seq_len
            counts[f"batches_by_{reason}"] += 1
            counts["failed_requests"] += failed
            counts["failed_batches"] += failed == len(requests)

    def _build_feeds(self, requests: list[_Request], lengths: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        """Scatter the requests' tokens to their flat offsets `starts` in one [B, S] batch."""
        total, slots = int(lengths.sum()), self.batch_size * self.seq_len
        first = np.cumsum(lengths) - lengths  # each request's start in the concatenated tokens
        dest = np.repeat(starts - first, lengths) + np.arange(total)
        feeds = {}
        for name, (_, dtype, trailing) in self._token_inputs.items():
            flat = np.zeros((slots, *trailing), dtype)
            flat[dest] = np.concatenate([r.tokens[name] for r in requests])
            feeds[name] = flat.reshape(self.batch_size, self.seq_len, *trailing)
        if self.mask_name is not None:
            dtype = np.dtype(self.inputs[self.mask_name]["dtype"])
            flat = np.zeros(slots, dtype)
            if self.mode == "unpack_repack":
                flat[dest] = 1
            else:
                flat[dest] = np.repeat(segment_ids(starts // self.seq_len, starts), lengths)
            feeds[self.mask_name] = flat.reshape(self.batch_size, self.seq_len)
        if self._unpack_info is not None:
            name, dtype = self._unpack_info
            info = np.zeros(self.max_valid_num, dtype)
            info[: len(lengths)] = lengths
            feeds[name] = info
        return feeds

    def _deliver(self, requests: list[_Request], lengths: np.ndarray, starts: np.ndarray, results: dict) -> int:
        """Copy each request's slice of every output into its arrays; complete the futures."""
        flat = {
            name: out.reshape(-1, *out.shape[2:])
            for name, out in results.items()
            if self._output_specs[name][0] == "packed"
        }
        failed = 0
        for i, (request, n, start) in enumerate(zip(requests, lengths.tolist(), starts.tolist())):
            try:
                for name, target in request.outputs.items():
                    layout = self._output_specs[name][0]
                    if layout == "unpacked":
                        target[:n] = results[name][i, :n]
                    elif layout == "packed":
                        target[:n] = flat[name][start : start + n]
                    else:
                        target[...] = results[name][i]
            except Exception as exc:  # the caller's array changed under us, or similar
                error = RequestError(f"copying this request's outputs failed: {_one_line(exc)}")
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


def _static(dims: list) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def _one_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
