"""A Hugging Face or sentence-transformers model folder on disk -> one ONNX model poprt-lite packs.

    poprt-lite export all-MiniLM-L6-v2/ -o minilm/model.onnx

The folder is what `SentenceTransformer.save` or `save_pretrained` writes (or a hub snapshot already
on disk; nothing is downloaded): a sentence-transformers folder (modules.json: Transformer, then
Pooling, Dense, Normalize as listed, the pooling mode from 1_Pooling/config.json), or a plain Hugging
Face folder (config.json), which sentence-transformers loads as the transformer plus mean pooling.
sentence-transformers assembles the modules and torch.onnx exports them as one graph, `(tokenizer
tensors) -> (token_embeddings [batch, sequence, hidden], sentence_embedding [batch, dim])` with dynamic
batch and sequence axes, which the packing passes then pack like any export (the pooling head is found
by structure, see patterns/pooling.py). The export is checked against the torch modules (max abs
difference < 1e-4, each of three sentences alone) before it is kept. The folder's top-level
JSON, text and .model files (tokenizer.json, vocabularies, config.json, sentence_bert_config.json,
...; not modules.json, whose modules are in the graph) are copied beside the model, so
`Embedder.open(model)` finds its tokenizer and length limit.

A model argument that is a folder (`resolve_model`, which every command taking a model calls first:
`Embedder.open`, `poprt-lite embed`) is exported on first use into the cache (`~/.cache/poprt-lite/exports/`, `POPRT_LITE_CACHE`
to move it), keyed by the folder's content, and read from there afterwards.

torch, transformers and sentence-transformers are imported only while exporting (`pip install
'poprt-lite[export]'`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from poprt_lite.ir import default_cache_dir
from poprt_lite.errors import PoprtError, one_line, option
from poprt_lite.vocab import INPUT_IDS, Role

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")  # torch.onnx's two exporters (TorchScript: opset 17, dynamo: 18)
DEFAULT_EXPORTER = "torchscript"
MODEL_FILE = "model.onnx"  # the export's name in a cache entry
# What marks a folder as a model: sentence-transformers' module list, or a Hugging Face config.
FOLDER_MARKERS = ("modules.json", "config.json")
# Files copied beside the export: the tokenizer, vocabularies and configuration (never the weights;
# nor modules.json, whose modules are in the graph now).
COPIED_SUFFIXES = (".json", ".txt", ".model")
NOT_COPIED = ("modules.json",)
WEIGHTS = ("*.safetensors", "*.bin")
# The sentence-transformers modules an export takes, by class name (their import paths move between versions).
EXPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
CHECK_SENTENCES = ("A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.", "Hi")
CHECK_ATOL = 1e-4
# Part of the cache key: changes whenever what an export writes changes.
RECIPE = "1"


def is_model_folder(path: str | os.PathLike) -> bool:
    """Is `path` a folder holding a sentence-transformers or Hugging Face model?"""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in FOLDER_MARKERS)


def resolve_model(model: str | os.PathLike, *, exporter: str = DEFAULT_EXPORTER) -> Path:
    """A model argument as a file to open: a model folder becomes its export in the cache
    (`cached_export`, exported on first use, with its tokenizer beside it); any other path is
    returned as it is (the caller opens it and reports what is wrong with it)."""
    path = Path(model)
    return cached_export(path, exporter=exporter) if path.is_dir() else path


def cached_export(folder: str | os.PathLike, *, exporter: str = DEFAULT_EXPORTER, cache_dir: str | os.PathLike | None = None) -> Path:
    """The export of the model folder `folder` in the cache, made on first use; returns the model
    file (its tokenizer and config files beside it). The entry is keyed by the folder's content
    and the exporter: an edited folder is exported again."""
    folder = _model_folder(folder)
    _check_exporter(exporter)
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "exports"
    entry = root / f"{folder.resolve().name}.{exporter}.{content_key(folder, exporter)[:16]}"
    model = entry / MODEL_FILE
    if model.is_file():
        return model
    log.warning("exporting '%s' with torch.onnx (%s) into %s; later runs read it from there", folder, exporter, entry)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    except OSError as exc:
        raise PoprtError(f"cannot write the export cache '{root}' ({exc.strerror or exc}); set POPRT_LITE_CACHE to a writable folder") from exc
    try:
        _export_into(folder, staging, MODEL_FILE, exporter)
        try:
            os.replace(staging, entry)
        except OSError:
            if not model.is_file():  # another process made the same entry meanwhile: keep it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def export_folder(folder: str | os.PathLike, output: str | os.PathLike, *, exporter: str = DEFAULT_EXPORTER) -> list[Path]:
    """Export the model folder `folder` to the ONNX file `output`, its tokenizer and config files
    beside it (see the module docstring); returns the files written, the model first. Nothing is
    written unless the export succeeds and matches its torch modules."""
    folder = _model_folder(folder)
    _check_exporter(exporter)
    output = Path(output)
    if output.is_dir():
        raise PoprtError(f"output '{output}' is a folder; give the model file to write, e.g. {output / MODEL_FILE}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as staging:
            staged = _export_into(folder, Path(staging), output.name, exporter)
            written = []
            for file in staged:
                os.replace(file, output.parent / file.name)
                written.append(output.parent / file.name)
    except OSError as exc:
        raise PoprtError(f"cannot write '{output}' ({exc.strerror or exc})") from exc
    return written


def content_key(folder: Path, exporter: str) -> str:
    """sha256 of every file of `folder` (relative path and bytes, in path order), the exporter and
    the recipe."""
    digest = hashlib.sha256(f"poprt-lite export {RECIPE} {exporter}\n".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\n{path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _model_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise PoprtError(f"model folder '{folder}' does not exist")
    if not is_model_folder(folder):
        raise PoprtError(
            f"'{folder}' is not a model folder: it has no modules.json (sentence-transformers) or config.json "
            "(Hugging Face); pass the folder the model was saved to"
        )
    if not any(next(folder.rglob(pattern), None) for pattern in WEIGHTS):
        exported = next(folder.glob("*.onnx"), None)
        fix = f"pass the ONNX model itself ({exported})" if exported else "pass the folder the model was saved to"
        raise PoprtError(f"model folder '{folder}' holds no weights ({' or '.join(WEIGHTS)}); {fix}")
    return folder


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise PoprtError(f"{option('exporter')} must be one of {', '.join(EXPORTERS)}, got '{exporter}'")


def _export_into(folder: Path, staging: Path, name: str, exporter: str) -> list[Path]:
    """Export `folder` to `staging/name`, check it, copy the tokenizer and config files beside it;
    returns the files, the model first."""
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        from poprt_lite.ir import torch_export
    except ImportError as exc:
        raise PoprtError(f"exporting a model folder needs torch, transformers and sentence-transformers ({exc}): pip install 'poprt-lite[export]'") from None
    if not (folder / "modules.json").is_file():
        log.warning("'%s' has no modules.json: exported as sentence-transformers loads it, the transformer with mean pooling", folder)
    try:
        with _quiet_loaders():
            st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as exc:  # whatever the loaders raise for a folder they cannot read
        raise PoprtError(f"sentence-transformers cannot load '{folder}' ({one_line(exc)})") from None
    for child in st:
        if type(child).__name__ not in EXPORTED_MODULES:
            raise PoprtError(f"'{folder}' has a {type(child).__name__} module; an export takes {', '.join(EXPORTED_MODULES)}")
    if st.default_prompt_name:
        log.warning("'%s' prepends the prompt '%s' by default in encode; poprt-lite embeds the text as given", folder, st.default_prompt_name)
    if st.truncate_dim:
        log.warning("'%s' truncates embeddings to %d dimensions in encode; the export returns them whole", folder, st.truncate_dim)
    st.eval()
    tokenize = getattr(st, "preprocess", None) or st.tokenize  # renamed in sentence-transformers 6
    batch = tokenize(list(CHECK_SENTENCES[:2]))
    names = [n for n in (INPUT_IDS, Role.attention_mask.value, Role.token_type_ids.value) if n in batch]
    example = {n: batch[n].numpy() for n in names}
    outputs = ["token_embeddings", "sentence_embedding"]
    module = torch_export.SentenceTransformerExport(st, names).eval()
    path = staging / name
    with torch.no_grad():
        if exporter == "dynamo":
            torch_export.export_dynamo(module, example, names, outputs, path, max_sequence=None)
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "token_embeddings"]}
            axes["sentence_embedding"] = {0: "batch"}
            torch_export.export_torchscript(module, tuple(torch.from_numpy(example[n]) for n in names), names, outputs, axes, path)
    _check_export(module, path, tokenize, names, folder)
    files = [path]
    for source in sorted(folder.iterdir()):
        if source.is_file() and source.suffix in COPIED_SUFFIXES and source.name not in NOT_COPIED:
            shutil.copyfile(source, staging / source.name)
            files.append(staging / source.name)
    return files


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """transformers' and sentence-transformers' loading chatter (progress bars, load reports of
    unused weights such as BERT's pooler) off: poprt-lite says what it does itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    st_logger = logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    st_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        st_logger.setLevel(st_level)


def _check_export(module, path: Path, tokenize, names: list[str], folder: Path) -> None:
    """Each check sentence alone through onnxruntime gives the torch modules' sentence embedding."""
    import torch

    from poprt_lite.runtime.session import create_session

    session = create_session(path)
    for sentence in CHECK_SENTENCES:
        feeds = {n: v for n, v in tokenize([sentence]).items() if n in names}
        with torch.no_grad():
            want = module(*(feeds[n] for n in names))[1].numpy()
        (got,) = session.run(["sentence_embedding"], {n: v.numpy() for n, v in feeds.items()})
        difference = np.abs(got - want).max()
        if not difference < CHECK_ATOL:
            raise PoprtError(f"the export of '{folder}' differs from its torch modules by {difference:.3g} on {sentence!r}")
