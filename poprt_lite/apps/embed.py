"""Text in, vectors out: sentence embeddings from a packed model and its tokenizer.json.

    from poprt_lite.embed import Embedder

    embedder = Embedder("out/executable.popef", "all-MiniLM-L6-v2/")  # or .../tokenizer.json
    vectors = embedder.embed(["A man is eating food.", "A man is riding a horse."])  # float32 [2, 384]
    vector = Embedder.open("all-MiniLM-L6-v2/").embed("A man is eating food.")  # float32 [384]

The model is a packed artifact whose pooling head was placed per request (see the README's
"Sentence embeddings"), or an exported ONNX model, packed in memory by `Embedder.from_model`, or
(`Embedder.open`) a Hugging Face or sentence-transformers model folder, exported into the cache on
first use (`apps/export.py`) and packed in memory. The
tokenizer is the `tokenizers` library's (`pip install 'poprt-lite[text]'`), loaded from the model's
own tokenizer.json (nothing is downloaded), without padding (requests are unpadded). Sentences are
truncated at `max_length` tokens: the argument, else a sentence-transformers folder's
max_seq_length (its sentence_bert_config.json's, else tokenizer_config.json's model_max_length, where
newer sentence-transformers versions keep it), else the tokenizer.json's own truncation, and never more than
the artifact takes (its segment_max_size); `embed` says how many were (a warning).

`embed` / `embed_file` pack a whole set of sentences offline (`ModelRunner.run_requests`, longest
first: see `iter_embed`) and return one row of the per-request output per sentence, in order; one
sentence given as a str gives its vector alone, as `SentenceTransformer.encode(str)` does.
`online(config)` serves single sentences through a PackRunner instead.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from poprt_lite.ir import artifact as artifact_module
from poprt_lite import ir
from poprt_lite.apps.export import resolve_model
from poprt_lite.errors import PoprtError, option, whole_number
from poprt_lite.runtime import modes
from poprt_lite.runtime.config import PackRunnerConfig
from poprt_lite.runtime.model_runner import ModelRunner
from poprt_lite.runtime.pack_runner import PackFuture, PackRunner
from poprt_lite.runtime.session import check_threads
from poprt_lite.vocab import Layout, Role

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Where sentence-transformers keeps a folder's max_seq_length: sentence_bert_config.json (folders its
# older versions saved), else the tokenizer's model_max_length in tokenizer_config.json (newer ones).
LENGTH_LIMITS = (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length"))
NO_LIMIT = 10**9  # transformers writes model_max_length 1e30 for a tokenizer without a limit
# `from_model`'s packing when none is given: one dynamic token stream per batch (no padding at all).
DEFAULT_PACK_ARGS = {"mode": str(modes.TOKEN_STREAM.name), "max_valid_num": "64", "max_tokens": "4096"}


def check_max_length(max_length: object) -> None:
    """None (the tokenizer's or folder's own limit) or a whole number of tokens >= 1."""
    if max_length is not None:
        whole_number(max_length, 1, option("max_length"))


def load_tokenizer(path: str | os.PathLike | Any, max_length: int | None = None):
    """`tokenizers.Tokenizer` from `path` (a tokenizer.json, or a folder holding one) with padding
    off and truncation at `max_length` (default: the folder's or the file's own limit, see the
    module docstring); also returns that limit (None: no truncation). `path` may be a loaded
    `Tokenizer` too (one shipped to another process): a copy is configured, its own truncation the
    default limit."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PoprtError("embedding text needs the tokenizers package: pip install 'poprt-lite[text]'") from None
    check_max_length(max_length)
    if isinstance(path, Tokenizer):
        tokenizer = Tokenizer.from_str(path.to_str())
    else:
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise PoprtError(f"tokenizer '{file}' does not exist; pass a tokenizer.json or the model folder holding it")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise PoprtError(f"'{file}' is not a tokenizers tokenizer.json ({' '.join(str(exc).split())})") from None
        if max_length is None:
            max_length = _folder_max_length(file.parent)
    if max_length is None and tokenizer.truncation is not None:
        max_length = int(tokenizer.truncation["max_length"])
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    return tokenizer, max_length


def _folder_max_length(folder: Path) -> int | None:
    """The sentence-transformers max_seq_length of the model folder `folder` (`LENGTH_LIMITS`)."""
    for name, key in LENGTH_LIMITS:
        config = folder / name
        if not config.is_file():
            continue
        try:
            value = json.loads(config.read_text()).get(key)
        except (ValueError, AttributeError):
            raise PoprtError(f"'{config}' is not a JSON object with {key}") from None
        if value and int(value) < NO_LIMIT:
            return int(value)
    return None


class Embedder:
    """One embedding per sentence from a packed artifact with a per-request (pooled) output.

    `output` names that output when the model has several; `max_length` overrides the truncation
    limit; `threads` is onnxruntime's intra-op thread count (0: one per core).
    """

    def __init__(
        self,
        model: str | os.PathLike | artifact_module.Artifact,
        tokenizer: str | os.PathLike,
        *,
        output: str | None = None,
        max_length: int | None = None,
        threads: int = 0,
    ) -> None:
        self.artifact = model if isinstance(model, artifact_module.Artifact) else artifact_module.load_artifact(model)
        self.runner = ModelRunner(self.artifact, threads=threads)
        interface = self.runner.interface
        if interface is None:
            raise PoprtError(
                f"'{self.artifact.path}' is not packed; compile it with {option('pack_args')} (or use Embedder.from_model)"
            )
        self.interface = interface
        self.output = _pick_output(interface, output, self.artifact.path)
        self.dimension = interface.outputs[self.output].trailing
        self.tokenizer, limit = load_tokenizer(tokenizer, max_length)
        self.max_length = interface.max_length if limit is None else min(limit, interface.max_length)
        if limit is not None and limit > interface.max_length:
            log.warning(
                "sentences are truncated at %d tokens, the artifact's limit (segment_max_size); the tokenizer allows %d",
                interface.max_length, limit,
            )
        self.tokenizer.enable_truncation(self.max_length)
        self._types = next((n for n, t in interface.token_inputs.items() if t.role is Role.token_type_ids), None)

    @classmethod
    def from_model(
        cls,
        model: str | os.PathLike,
        tokenizer: str | os.PathLike,
        *,
        pack_args: dict[str, str] | None = None,
        input_shape: dict[str, tuple[int, ...]] | None = None,
        output: str | None = None,
        max_length: int | None = None,
        threads: int = 0,
        precision: str | None = None,
    ) -> "Embedder":
        """Pack an exported ONNX model in memory (`pack_model`) and embed with it."""
        built = pack_model(model, tokenizer, pack_args=pack_args, input_shape=input_shape, max_length=max_length, precision=precision)
        return cls(built, tokenizer, output=output, max_length=max_length, threads=threads)

    @classmethod
    def open(cls, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **options: Any) -> "Embedder":
        """`model` as it comes (`open_artifact`, which takes `pack_args` / `input_shape` / `precision` among
        `options`), or a Hugging Face / sentence-transformers model folder (exported into the cache
        on first use, `apps.export.resolve_model`, then packed in memory). `tokenizer` defaults to
        the tokenizer.json beside the model (for a folder: its own, copied beside its export)."""
        check_threads(options.get("threads", 0))  # before any export or packing
        check_max_length(options.get("max_length"))
        model = resolve_model(model)
        tokenizer = model.parent if tokenizer is None else tokenizer
        packing = {name: options.pop(name) for name in PACKING_KEYWORDS if name in options}
        built = open_artifact(model, tokenizer, max_length=options.get("max_length"), **packing)
        return cls(built, tokenizer, **options)

    # ----------------------------------------------------------------------------- requests

    def requests(self, sentences: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """One unpadded request per sentence (token ids, and token types if the model takes them)."""
        return self._encode(sentences)[0]

    def _encode(self, sentences: Sequence[str]) -> tuple[list[dict[str, np.ndarray]], int]:
        """`requests(sentences)`, and how many sentences were truncated at `max_length`."""
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
        if bad is not None:
            raise PoprtError(f"sentence {bad} is a {type(sentences[bad]).__name__}, not a str")
        requests, truncated = [], 0
        for encoding in self.tokenizer.encode_batch(list(sentences)):
            request = {self.interface.dynamic_input: np.asarray(encoding.ids, np.int64)}
            if self._types is not None:
                request[self._types] = np.asarray(encoding.type_ids, np.int64)
            requests.append(request)
            truncated += bool(encoding.overflowing)
        return requests, truncated

    # ------------------------------------------------------------------------------ offline

    def embed(self, sentences: str | Sequence[str], *, progress: bool = False) -> np.ndarray:
        """The embeddings of `sentences`, one row each, in order (`[len(sentences), *dimension]`);
        of one sentence given as a str, its embedding alone (`[*dimension]`)."""
        if isinstance(sentences, str):
            return self.embed([sentences], progress=progress)[0]
        return _stack(self.iter_embed(sentences, progress=progress), len(sentences), self.dimension)

    def iter_embed(self, sentences: Iterable[str], *, progress: bool = False, chunk: int = 4096) -> Iterator[np.ndarray]:
        """Yield each sentence's embedding in order, tokenizing and packing `chunk` sentences at a time.

        A chunk is packed with the artifact's offline default (`runtime.offline.default_algorithm`):
        in token_stream mode, whose attention rows are as long as the batch's longest request,
        `longest_first`, so no batch pairs a paragraph with many short queries. At the end, a
        warning says how many sentences were truncated at `max_length` tokens, if any."""
        if isinstance(sentences, str):
            raise PoprtError("iter_embed takes an iterable of sentences, not one str; embed(sentence) embeds one")
        iterator = iter(sentences)
        count = truncated = 0
        while taken := [s for _, s in zip(range(chunk), iterator)]:
            requests, cut = self._encode(taken)
            count, truncated = count + len(taken), truncated + cut
            yield from (answer[self.output] for answer in self.runner.run_requests(requests, progress=progress))
        if truncated:
            log.warning(
                "%d of %d sentences were longer than %d tokens and were truncated (%s)",
                truncated, count, self.max_length, option("max_length"),
            )

    def embed_file(self, lines: str | os.PathLike, output: str | os.PathLike, *, progress: bool = False) -> int:
        """Embed every line of the text file `lines` (line i -> row i; an empty line is the empty
        sentence) and save the float32 `[lines, *dimension]` array to `output` (.npy, written
        atomically). Returns the number of lines."""
        lines, output = Path(lines), Path(output)
        if not lines.is_file():
            raise PoprtError(f"input file '{lines}' does not exist")
        try:
            sentences = lines.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise PoprtError(f"'{lines}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        vectors = self.embed(sentences, progress=progress)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            ir.atomic_write(output, lambda tmp: _save_npy(tmp, vectors))
        except OSError as exc:
            raise PoprtError(f"cannot write '{output}' ({exc.strerror or exc})") from exc
        return len(sentences)

    # ------------------------------------------------------------------------------- online

    def online(self, config: PackRunnerConfig | None = None, threads: int = 0) -> "OnlineEmbedder":
        """Serve single sentences through a PackRunner on the same artifact (a context manager)."""
        return OnlineEmbedder(self, PackRunner(self.artifact, config, threads=threads))


class OnlineEmbedder:
    """Single sentences packed online (`Embedder.online`); `close()` (or `with`) stops the runner."""

    def __init__(self, embedder: Embedder, runner: PackRunner) -> None:
        self.embedder = embedder
        self.runner = runner

    def submit(self, sentence: str) -> PackFuture:
        """Queue one sentence; the future's `result()[embedder.output]` is its embedding."""
        (request,) = self.embedder.requests([sentence])
        return self.runner.execute_async(request, {self.embedder.output: np.zeros(self.embedder.dimension, np.float32)})

    def embed(self, sentences: str | Sequence[str]) -> np.ndarray:
        """Submit every sentence, then wait for all: one row each, in order (one str: its row alone)."""
        if isinstance(sentences, str):
            return self.embed([sentences])[0]
        futures = [self.submit(s) for s in sentences]
        name = self.embedder.output
        return _stack((f.result()[name] for f in futures), len(futures), self.embedder.dimension)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "OnlineEmbedder":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def pack_model(
    model: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    pack_args: dict[str, str] | None = None,
    input_shape: dict[str, tuple[int, ...]] | None = None,
    max_length: int | None = None,
    precision: str | None = None,
) -> artifact_module.Artifact:
    """Pack an exported ONNX model in memory (`poprt_lite.compile`) into an artifact. `pack_args`
    are --pack_args' keys (default: `DEFAULT_PACK_ARGS`, segment_max_size the tokenizer's limit);
    `input_shape` is needed by the static modes; `precision` is compile's (default fp32; int8:
    weights per channel, activations per token)."""
    from poprt_lite.compiler import CompileOptions, compile

    args = dict(DEFAULT_PACK_ARGS if pack_args is None else pack_args)
    if "segment_max_size" not in args:
        if tokenizer is None:
            raise PoprtError(f"packing '{model}' needs {option('pack_args')} segment_max_size=N (no tokenizer gives a length limit)")
        limit = load_tokenizer(tokenizer, max_length)[1]
        if limit is None:
            raise PoprtError("the tokenizer sets no length limit; give pack_args segment_max_size (or max_length)")
        args["segment_max_size"] = str(limit)
    options = CompileOptions(input_shape=dict(input_shape or {}), pack_args=args, precision=precision or "fp32")
    converted = compile(model, save=False, options=options).model
    fields = artifact_module.converted_fields(converted, Path(model).read_bytes())
    return artifact_module.in_memory(model, converted, fields)


def open_artifact(
    model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *, max_length: int | None = None, **packing: Any
) -> artifact_module.Artifact:
    """`model` as it comes: an artifact, a packed .onnx, or an exported ONNX model (packed in memory
    by `pack_model`, with `packing`, its keywords `pack_args` / `input_shape` / `precision`, which a
    packed model refuses). A model folder is resolved to its export first (`apps.export.resolve_model`) by the
    caller, which also takes its tokenizer from beside the export."""
    from poprt_lite import vocab

    path = Path(model)
    if not path.is_file():
        raise PoprtError(f"model '{path}' does not exist; pass an artifact, an .onnx file or a model folder")
    loaded = artifact_module.load_model_or_artifact(path)
    if isinstance(loaded, artifact_module.Artifact):
        _refuse_packing(packing)
        return loaded
    if vocab.pack_spec_of(ir.get_metadata(loaded)) is not None:
        _refuse_packing(packing)
        return artifact_module.in_memory(path, loaded, artifact_module.converted_fields(loaded, path.read_bytes()))
    return pack_model(path, tokenizer, max_length=max_length, **packing)


def embed(model: str | os.PathLike, tokenizer: str | os.PathLike, sentences: Sequence[str], **options: Any) -> np.ndarray:
    """`Embedder(model, tokenizer, **options).embed(sentences)`."""
    return Embedder(model, tokenizer, **options).embed(sentences)


# pack_model's keywords that only a model not packed yet takes (max_length applies to any model)
PACKING_KEYWORDS = tuple(name for name, p in inspect.signature(pack_model).parameters.items() if p.kind is p.KEYWORD_ONLY and name != "max_length")


def _refuse_packing(packing: dict[str, Any]) -> None:
    inspect.signature(pack_model).bind_partial(**packing)  # an unknown keyword: TypeError, as pack_model gives
    given = [n for n, value in packing.items() if value]
    if given:
        raise PoprtError(f"{given[0]} applies to an ONNX model that is not packed yet; this model is packed already")


def _pick_output(interface, output: str | None, path) -> str:
    pooled = [name for name, o in interface.outputs.items() if o.layout is Layout.per_request]
    if output is not None:
        if output not in interface.outputs:
            raise PoprtError(f"'{path}' has no output '{output}'; its outputs are: {', '.join(interface.outputs)}")
        if output not in pooled:
            raise PoprtError(
                f"output '{output}' of '{path}' has layout '{interface.outputs[output].layout}', not one row per "
                f"request; pooled outputs: {', '.join(pooled) or 'none'}"
            )
        return output
    if len(pooled) != 1:
        found = f"several ({', '.join(pooled)}): pass output=NAME" if pooled else "none (no pooling head after the encoder)"
        raise PoprtError(f"'{path}' must have one pooled (per-request) output to embed with; it has {found}")
    return pooled[0]


def _stack(rows: Iterable[np.ndarray], count: int, dimension: tuple) -> np.ndarray:
    out = np.empty((count, *dimension), np.float32)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(str) would append .npy to the temporary name
        np.save(f, array)
