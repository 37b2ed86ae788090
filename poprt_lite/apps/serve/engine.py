"""What the HTTP front serves: a runner (the artifact's PackRunner, the only batcher), the packed
interface it serves, and the model's tokenizer.

`Engine.open(model, tokenizer, ...)` builds one from a model as it comes (an artifact, a packed
.onnx, or an exported ONNX model packed at start as `Embedder.from_model` does); `Engine(runner,
interface, ...)` wraps a runner built elsewhere (a Ray Serve replica). Both the benchmark's baselines
are engines too: `batcher="dynamic"` (TEI's CPU backend: the original model, batches padded to their
longest, at most `max_batch_requests` requests and `max_batch_tokens` padded slots, no wait timer)
and `batcher="single"` (the original model, one request at a time).

Everything here is synchronous and thread-safe: the HTTP front tokenizes, checks and queues
(`submit_texts`, `submit`) and reads the outputs from a thread pool, never on its event loop. A client call of n
inputs becomes n requests of the runner, queued together and answered in order.

The head decides which routes a model serves (`Head`): a sentence-embedding model (one pooled
output) serves the embedding routes; a sequence classifier (a config.json beside the tokenizer
whose architecture ends with "Classification", as TEI reads it) serves /predict, or /rerank when
it has one label; every model serves its tensors over the Open Inference Protocol.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poprt_lite.apps.embed import TOKENIZER_FILE, load_tokenizer, open_artifact
from poprt_lite.apps.export import resolve_model
from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.runtime.config import PackRunnerConfig
from poprt_lite.runtime.dynamic_batcher import DynamicBatcher
from poprt_lite.runtime.interface import PackedInterface, read_packed_interface
from poprt_lite.runtime.pack_runner import PackFuture, PackRunner
from poprt_lite.runtime.requests import RequestChecker
from poprt_lite.runtime.session import create_session
from poprt_lite.vocab import Layout, Role

log = logging.getLogger(__name__)

BATCHERS = ("packing", "dynamic", "single")
# TEI's defaults for its queue (router/src/main.rs): a padded batch of at most 16384 token slots.
DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_MAX_BATCH_REQUESTS = 8
CONFIG_FILE = "config.json"  # a transformers model folder's: architectures, id2label


class Head(str, enum.Enum):
    """What a model's outputs are, as TEI's /info names it."""

    embedding = "embedding"
    classifier = "classifier"
    reranker = "reranker"
    tensor = "tensor"  # no pooled output: token outputs over the Open Inference Protocol only


class Truncation(str, enum.Enum):
    left = "left"
    right = "right"


@dataclass
class Call:
    """One client call queued on the runner: its n requests' futures and output arrays, in order."""

    futures: list[PackFuture]
    outputs: list[dict[str, np.ndarray]]
    blocks: dict[str, np.ndarray]  # per-request output -> the [n, ...] array the requests' rows are views of
    lengths: list[int]
    characters: int
    tokenization_s: float

    def outputs_block(self, name: str) -> np.ndarray:
        """Every request's row of per-request output `name`, in order (`[n, ...]`)."""
        return self.blocks[name]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def done(self) -> Future:
        """A future that completes when every request of the call has (one wake-up for the caller).

        The requests' futures keep their callbacks once run: the last drops its link to this
        future, so that a callback of this future holding the call makes no reference cycle (which
        would keep the call's arrays, and all it reaches, until the garbage collector's next pass)."""
        result: Future = Future()
        done: Future | None = result
        remaining = len(self.futures)
        lock = threading.Lock()

        def one_done(_) -> None:
            nonlocal done, remaining
            with lock:
                remaining -= 1
                if remaining:
                    return
                last, done = done, None
            last.set_result(None)

        if not self.futures:
            result.set_result(None)
        for future in self.futures:
            future.add_done_callback(one_done)
        return result

    def withdraw(self) -> None:
        """Withdraw the requests whose batch has not started (`PackFuture.cancel`): nobody waits."""
        for future in self.futures:
            future.cancel()

    @property
    def withdrawn(self) -> bool:
        return any(f.cancelled() for f in self.futures)

    def error(self) -> BaseException | None:
        """The first request's error, if any failed (the call is all or nothing)."""
        return next((f.exception() for f in self.futures if f.exception() is not None), None)

    def timings(self) -> tuple[float, float]:
        """Mean queue and inference seconds of the call's requests (TEI's per-call headers)."""
        batches = [(f.queued, f.batch) for f in self.futures if f.batch is not None]
        if not batches:
            return 0.0, 0.0
        queue = sum(batch.started - queued for queued, batch in batches)
        inference = sum(batch.finished - batch.started for _, batch in batches)
        return queue / len(batches), inference / len(batches)


class Engine:
    """A runner, the interface it serves and the tokenizer (see the module docstring).

    `runner` is a PackRunner or a DynamicBatcher (`execute_async(feeds, outputs)`, `pending`,
    `batch_listeners`, `close(timeout)`); `interface` the packed interface whose requests it takes
    (a PackRunner's own). `tokenizer`: a tokenizer.json or the folder holding it (None: token ids
    only); a config.json beside it tells a classifier's labels. `output`: the pooled output, when
    the model has several.
    """

    def __init__(
        self,
        runner: PackRunner | DynamicBatcher,
        interface: PackedInterface,
        *,
        tokenizer: str | os.PathLike | None = None,
        max_length: int | None = None,
        output: str | None = None,
        model_id: str | None = None,
        batcher: str = "packing",
    ) -> None:
        self.runner, self.interface, self.batcher = runner, interface, batcher
        self.checker = RequestChecker(interface)
        self.model_id = model_id or interface.path.stem
        pooled = [name for name, o in interface.outputs.items() if o.layout is Layout.per_request]
        if output is not None and output not in pooled:
            raise PoprtError(f"'{interface.path}' has no pooled (per-request) output '{output}'; pooled outputs: {', '.join(pooled) or 'none'}")
        if output is None and len(pooled) > 1:
            raise PoprtError(f"'{interface.path}' has several pooled outputs ({', '.join(pooled)}); name the one to serve with output")
        self.output = output or (pooled[0] if pooled else None)
        tokens = [n for n, o in interface.outputs.items() if o.layout is not Layout.per_request and o.trailing]
        self.token_output = tokens[0] if len(tokens) == 1 else None  # /embed_all's
        self.max_length = interface.max_length
        self._tokenizers: dict[tuple[bool, Truncation], Any] = {}
        self._tokenizer = None
        self.labels: list[str] = []
        self.head = Head.embedding if self.output else Head.tensor
        if tokenizer is not None:
            self._tokenizer, limit = load_tokenizer(tokenizer, max_length)
            self.max_length = interface.max_length if limit is None else min(limit, interface.max_length)
            self._tokenizer.no_truncation()
            folder = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
            self.labels = _classifier_labels(folder / CONFIG_FILE)
            values = int(np.prod(interface.outputs[self.output].trailing)) if self.output else 0
            if self.labels and values != len(self.labels):
                raise PoprtError(
                    f"'{folder / CONFIG_FILE}' names {len(self.labels)} labels; output '{self.output}' has {values} values per request"
                )
            if self.labels and self.output:
                self.head = Head.reranker if len(self.labels) == 1 else Head.classifier
        self._types = next((n for n, t in interface.token_inputs.items() if t.role is Role.token_type_ids), None)

    # --------------------------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        model: str | os.PathLike,
        tokenizer: str | os.PathLike | None = None,
        *,
        pack_args: dict[str, str] | None = None,
        input_shape: dict[str, tuple[int, ...]] | None = None,
        threads: int = 0,
        config: PackRunnerConfig | None = None,
        batcher: str = "packing",
        max_batch_requests: int = DEFAULT_MAX_BATCH_REQUESTS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_length: int | None = None,
        output: str | None = None,
        model_id: str | None = None,
        precision: str | None = None,
    ) -> Engine:
        """An engine for `model` as it comes; `batcher` picks the runner (see the module docstring)."""
        check_batcher(batcher)
        model_id = model_id or Path(model).stem
        model = resolve_model(model)  # a model folder: its export, made on first use
        tokenizer = tokenizer_of(model, tokenizer)
        if batcher != "packing" and not _is_unpacked(model):
            raise PoprtError(f"the {batcher} batcher runs the original model: pass the exported ONNX model, not a packed one ('{model}')")
        built = open_artifact(model, tokenizer, pack_args=pack_args, input_shape=input_shape, max_length=max_length, precision=precision)
        common = {"tokenizer": tokenizer, "max_length": max_length, "output": output, "model_id": model_id, "batcher": batcher}
        if batcher == "packing":
            runner = PackRunner(built, config, threads=threads)
            return cls(runner, runner.interface, **common)
        interface = read_packed_interface(built)  # the packed twin checks requests and names outputs
        session = create_session(Path(model), threads, spinning=False)
        roles = interface.input_roles
        unknown = [i.name for i in session.get_inputs() if i.name not in roles or i.type not in _ORT_TYPES]
        if unknown:
            raise PoprtError(f"the {batcher} batcher cannot feed input '{unknown[0]}' of '{model}'; serve it packed")
        inputs = {i.name: (roles[i.name], np.dtype(_ORT_TYPES[i.type])) for i in session.get_inputs()}
        pooled = [n for n, o in interface.outputs.items() if o.layout is Layout.per_request]
        runner = DynamicBatcher(
            session, inputs, list(interface.outputs),
            max_batch=max_batch_requests if batcher == "dynamic" else 1,
            timeout_microseconds=0,
            max_tokens=max_batch_tokens if batcher == "dynamic" else None,
            per_request=pooled,
        )
        return cls(runner, interface, **common)

    # -------------------------------------------------------------------------------- requests

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def tokenizer(self, truncate: bool, direction: Truncation = Truncation.right):
        """The tokenizer truncating at `max_length` from `direction`, or not truncating at all."""
        key = (truncate, Truncation(direction) if truncate else Truncation.right)
        if key not in self._tokenizers:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(self._tokenizer.to_str())
            if truncate:
                copy.enable_truncation(self.max_length, direction=key[1].value)
            self._tokenizers[key] = copy
        return self._tokenizers[key]

    def encode(
        self, texts: Sequence[str | tuple[str, str]], *, truncate: bool, direction: Truncation = Truncation.right, add_special_tokens: bool = True
    ) -> list:
        """`tokenizers` encodings of `texts` (strings or pairs), unpadded."""
        if self._tokenizer is None:
            raise RequestError("this server has no tokenizer for its model: send token ids")
        tokenizer = self.tokenizer(truncate, direction)
        if len(texts) == 1:  # one text: without encode_batch's hand-over to its thread pool
            text = texts[0]
            return [tokenizer.encode(*((text,) if isinstance(text, str) else text), add_special_tokens=add_special_tokens)]
        return tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def feeds_of(self, encodings: Sequence) -> list[dict[str, np.ndarray]]:
        feeds = []
        for encoding in encodings:
            request = {self.interface.dynamic_input: np.asarray(encoding.ids, np.int64)}
            if self._types is not None:
                request[self._types] = np.asarray(encoding.type_ids, np.int64)
            feeds.append(request)
        return feeds

    def check_lengths(self, lengths: Sequence[int]) -> None:
        """TEI's refusal of an input over the model's length when it is not to be truncated."""
        for n in lengths:
            if n > self.max_length:
                raise RequestError(f"`inputs` must have less than {self.max_length} tokens. Given: {n}")
            if n == 0:
                raise RequestError("`inputs` cannot be empty")

    def submit(self, feeds: Sequence[dict[str, np.ndarray]], outputs: Sequence[str], *, characters: int = 0, tokenization_s: float = 0.0) -> Call:
        """Check every request, then queue them all, in order; each gets arrays for `outputs`
        (per-request outputs of all the call's requests share one `[n, ...]` block)."""
        checked = [self.checker.tokens(f) for f in feeds]  # (length, tokens): one bad input refuses the call
        specs = self.interface.outputs
        blocks = {name: np.empty((len(feeds), *specs[name].trailing), np.float32) for name in outputs if specs[name].layout is Layout.per_request}
        arrays = [
            {name: blocks[name][i] if name in blocks else np.zeros((n, *specs[name].trailing), np.float32) for name in outputs}
            for i, (n, _) in enumerate(checked)
        ]
        # the requests are checked: the runner gets their tokens in the model's dtypes, filled in
        futures = [self.runner.execute_async(tokens, out) for (_, tokens), out in zip(checked, arrays, strict=True)]
        return Call(futures, arrays, blocks, [n for n, _ in checked], characters, tokenization_s)

    def submit_texts(
        self, texts: Sequence[str | tuple[str, str]], outputs: Sequence[str], *, truncate: bool, direction: Truncation = Truncation.right
    ) -> Call:
        """Tokenize `texts` (refusing one over the length unless `truncate`) and `submit` them."""
        started = time.perf_counter()
        encodings = self.encode(texts, truncate=truncate, direction=direction)
        if not truncate:
            self.check_lengths([len(e.ids) for e in encodings])
        feeds = self.feeds_of(encodings)
        characters = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts)
        return self.submit(feeds, outputs, characters=characters, tokenization_s=time.perf_counter() - started)

    def close(self, timeout: float | None = None) -> None:
        """Stop the runner once what it holds has run (waiting up to `timeout` seconds)."""
        self.runner.close(timeout=timeout)

    # ------------------------------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        """TEI's /info fields that apply, and the packing's own."""
        io = self.interface
        if self.head in (Head.classifier, Head.reranker):
            labels = dict(enumerate(self.labels))
            model_type = {self.head.value: {"id2label": {str(k): v for k, v in labels.items()}, "label2id": {v: k for k, v in labels.items()}}}
        else:
            model_type = {self.head.value: {"output": self.output or ", ".join(io.outputs)}}
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": "float32",
            "model_type": model_type,
            "max_input_length": self.max_length,
            "batcher": self.batcher,
            "pack_mode": io.mode.value,
            "max_valid_num": io.max_valid_num,
            "max_batch_tokens": io.batch_size * io.seq_len,
            "tokenizer": self.has_tokenizer,
        }


def tokenizer_of(model: str | os.PathLike, tokenizer: str | os.PathLike | None) -> str | os.PathLike | None:
    """The tokenizer an engine of `model` reads: `tokenizer`, else the model's folder when it holds a
    tokenizer.json, else None (token ids only)."""
    if tokenizer is not None and not Path(tokenizer).exists():
        raise PoprtError(f"tokenizer '{tokenizer}' does not exist; pass a tokenizer.json or the model folder holding it")
    if tokenizer is None and (Path(model).parent / TOKENIZER_FILE).is_file():
        return Path(model).parent
    return tokenizer


def check_batcher(batcher: str) -> None:
    if batcher not in BATCHERS:
        raise PoprtError(f"batcher must be one of {', '.join(BATCHERS)}, got '{batcher}'")


_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(bool)": np.bool_}


def _is_unpacked(model: str | os.PathLike) -> bool:
    from poprt_lite import ir, vocab
    from poprt_lite.ir.artifact import Artifact, load_model_or_artifact

    path = Path(model)
    if not path.is_file():
        raise PoprtError(f"model '{path}' does not exist; pass an artifact or an .onnx file")
    loaded = load_model_or_artifact(path)
    return not isinstance(loaded, Artifact) and vocab.pack_spec_of(ir.get_metadata(loaded)) is None


def _classifier_labels(config: Path) -> list[str]:
    """A sequence classifier's labels in id order (TEI: architectures ending with 'Classification'
    and id2label); [] for any other model."""
    if not config.is_file():
        return []
    try:
        data = json.loads(config.read_text())
        if not any(a.endswith("Classification") for a in data.get("architectures") or []):
            return []
        id2label = {int(k): str(v) for k, v in data["id2label"].items()}
    except (ValueError, KeyError, AttributeError, TypeError):
        raise PoprtError(f"'{config}' is a classifier's config.json without a valid id2label") from None
    return [id2label[i] for i in sorted(id2label)]


