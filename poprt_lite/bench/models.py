"""Compile (and cache) the benchmark's compiled artifacts from one source model.

Kinds: `None` (padded: static `[batch, seq_len]` shapes and `position_ids` as an input, PopRT's
`bert_bs16_sl256.onnx`) and each registered pack mode (the same plus `--pack_args mode=...`; a mode without a
static shape (its descriptor's `static`: token_stream) takes no `--input_shape` and `max_tokens=batch*seq_len`, the static
batch's token slots).
Artifacts are cached under `<work_dir>/compiled/`, keyed by the source model's sha256, the compile
options and a hash of poprt-lite's compiler sources, so editing a pass never reuses a stale model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx

from poprt_lite import __version__
from poprt_lite.ir.artifact import Artifact, load_artifact
from poprt_lite.compiler import CompileOptions
from poprt_lite.compiler import compile as compile_model
from poprt_lite.compiler.servable import export_artifact
from poprt_lite.errors import ArtifactError, PoprtError
from poprt_lite.runtime import modes
from poprt_lite.vocab import INPUT_IDS, Layout, MetaKey

KINDS: tuple[str | None, ...] = (None, *modes.names())
_SOURCE_PARTS = ("passes", "ops", "patterns", "compiler", "ir")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def compiler_hash() -> str:
    """Hash of the poprt-lite sources that shape a compiled model."""
    root = Path(__file__).resolve().parents[1]  # the package
    digest = hashlib.sha256(__version__.encode())
    for part in _SOURCE_PARTS:
        target = root / part
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for f in files:
            digest.update(str(f.relative_to(root)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def token_inputs(source: Path) -> list[str]:
    """Names of the source model's `[batch, sequence]` inputs."""
    model = onnx.load(str(source), load_external_data=False)
    names = [i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) == 2]
    if INPUT_IDS not in names:
        raise PoprtError(f"model '{source}' has no [batch, sequence] input 'input_ids'; the benchmark needs a BERT-like encoder")
    return names


def prepare_artifacts(
    source: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    segment_max_size: int,
    kinds: tuple[str | None, ...] = KINDS,
    ort_fusions: bool = False,
    dynamic_rows: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str | None, Artifact]:
    """The artifact of each kind, compiled on first use and loaded (verified) from the cache.

    `dynamic_rows` compiles the static kinds with `--dynamic_rows` (a batch runs on the rows it uses).

    `ort_fusions` also runs onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer`,
    model type bert) on every compiled model, padded and packed alike.
    """
    source = Path(source)
    if not source.is_file():
        raise PoprtError(f"model '{source}' does not exist")
    say = on_step or (lambda _msg: None)
    say(f"hashing {source.name}")
    key = f"{source.stem[:40]}-{file_sha256(source)[:12]}-{compiler_hash()[:12]}"
    shape = None
    artifacts = {}
    for kind in kinds:
        name = kind_name(kind)
        pack = {} if kind is None else {
            "max_valid_num": str(max_valid_num), "segment_max_size": str(segment_max_size), "mode": str(kind)
        }
        static = kind is None or modes.get(kind).static
        if not static:
            pack["max_tokens"] = str(batch_size * seq_len)
        folder = Path(work_dir) / "compiled" / f"{key}-{name}-b{batch_size}s{seq_len}" / (
            f"n{max_valid_num}l{segment_max_size}" if pack else "plain"
        )
        if ort_fusions:
            folder = folder.with_name(folder.name + "-ortfused")
        if dynamic_rows and static:
            folder = folder.with_name(folder.name + "-rows")
        path = folder / "executable.popef"
        if path.is_file():
            try:
                say(f"loading cached {name} artifact")
                artifacts[kind] = load_artifact(path)
                continue
            except ArtifactError:
                path.unlink()
        if shape is None:
            shape = {name: (batch_size, seq_len) for name in token_inputs(source)}
        say(f"compiling {name} model")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        options = CompileOptions(
            input_shape=shape if static else {}, pack_args=pack, export_position_ids=True, dynamic_rows=dynamic_rows and static
        )
        result = compile_model(source, tmp / "model.onnx", output_dir=tmp, export_popef=True, options=options)
        Path(result.output_model).unlink()
        if ort_fusions:
            say(f"fusing {name} model (onnxruntime transformer optimizer)")
            fuse_artifact(tmp / "executable.popef")
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
        artifacts[kind] = load_artifact(path)
    return artifacts


def kind_name(kind: str | None) -> str:
    """`padded` for the padded artifact, else the pack mode."""
    return Layout.padded.value if kind is None else str(kind)


def fuse_artifact(path: Path) -> None:
    """Rewrite an artifact with onnxruntime's transformer fusions applied to its model."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    art = load_artifact(path)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = art.model()
    heads, hidden = attention_geometry(model)
    fused = optimize_model(model, model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0).model
    manifest = art.manifest
    export_artifact(path, fused, {
        "source_sha256": manifest["source_model_sha256"], MetaKey.precision.value: manifest[MetaKey.precision.value],
        "pipeline": [*manifest["pipeline"], {"name": "onnxruntime.transformers.optimizer", "options": {"model_type": "bert"}}],
    })


def word_embedding(model: onnx.ModelProto) -> onnx.TensorProto | None:
    """The token-embedding table (the initializer a Gather indexes with `input_ids`), if found."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == INPUT_IDS and node.input[0] in inits:
            return inits[node.input[0]]
    return None


def attention_geometry(model: onnx.ModelProto) -> tuple[int, int]:
    """(heads, hidden) of a BERT-like model: the word-embedding width, and the head count of the
    `[batch, heads, seq, head_dim]` attention tensors; 0 where not found (the optimizer guesses)."""
    table = word_embedding(model)
    if table is None:
        return 0, 0
    hidden = int(table.dims[-1])
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    for node in model.graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type == "Transpose" and perm == [0, 2, 1, 3]:
            shape = shapes.get(node.output[0], [])
            if len(shape) == 4 and shape[1] > 0 and shape[1] * shape[3] == hidden:
                return int(shape[1]), hidden
    return 0, hidden
