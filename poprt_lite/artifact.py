"""The compiled artifact: one file holding the converted model and an executable-style manifest.

The file is a zip archive (named `executable.popef` by default, for drop-in compatibility with PopRT
scripts) with exactly three members:

- `model.onnx`: the converted model, with custom-op function bodies attached;
- `manifest.json`: everything a runtime needs to drive the model (see `build_manifest`);
- `manifest.sha256`: the sha256 of `manifest.json`, so an edited manifest is detected.

Loading verifies both checksums and the format version before anything is parsed further, reads
members into memory (nothing is extracted to disk) and never imports or unpickles anything.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

import poprt_lite
from poprt_lite import ir, vocab
from poprt_lite.errors import ArtifactError, one_line
from poprt_lite.vocab import MetaKey

FORMAT = "poprt-lite-artifact"
FORMAT_VERSION = 1
DEFAULT_NAME = "executable.popef"
MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER = "model.onnx", "manifest.json", "manifest.sha256"
MEMBERS = (MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER)
# A member may expand to at most this multiple of the archive size (zip-bomb guard); members are
# stored uncompressed, so honest artifacts expand by ~1x.
MAX_EXPANSION = 4

@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    model_bytes: bytes

    def model(self) -> onnx.ModelProto:
        return onnx.load_from_string(self.model_bytes)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_manifest(
    model: onnx.ModelProto,
    *,
    source_sha256: str,
    model_sha256: str,
    precision: str,
    pipeline: list[dict[str, Any]],
) -> dict[str, Any]:
    """Describe `model` for a runtime: interface with roles and layouts, packing, offsets."""
    meta = ir.get_metadata(model)
    pack = vocab.pack_spec_of(meta)

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor_type = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim],
        }

    # Integer inputs that index an embedding table: ids at or past its rows would fail a whole batch.
    rows = embedding_table_rows(model, [v.name for v in model.graph.input])
    inputs = [
        {
            **describe(v),
            "role": vocab.role_of(meta, v.name).value,
            "table_rows": rows.get(v.name),
        }
        for v in model.graph.input
    ]
    outputs = [{**describe(v), "layout": vocab.layout_of(meta, v.name).value} for v in model.graph.output]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "poprt_lite_version": poprt_lite.__version__,
        "source_model_sha256": source_sha256,
        "model_sha256": model_sha256,
        MetaKey.precision.value: precision,
        "pipeline": pipeline,
        "inputs": inputs,
        "outputs": outputs,
        MetaKey.pack.value: pack.as_dict() if pack else None,
        "custom_op_domains": sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}),
        MetaKey.position_offset.value: vocab.int_of(meta, MetaKey.position_offset),
        MetaKey.vocab_size.value: vocab.int_of(meta, MetaKey.vocab_size) or None,
    }


def embedding_table_rows(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """For each graph input in `names`, the fewest rows among the constant 2-D tables that an
    axis-0 Gather looks it up in (through Casts and Identities); inputs used otherwise are left out."""
    graph = model.graph
    rows = {t.name: int(t.dims[0]) for t in graph.initializer if len(t.dims) == 2}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and len(value.dims) == 2:
                rows[node.output[0]] = int(value.dims[0])
        for position, tensor in enumerate(node.input):
            consumers[tensor].append((node, position))
    found = {}
    for name in names:
        frontier, seen = [name], {name}
        while frontier:
            for node, position in consumers[frontier.pop()]:
                if node.op_type in ("Cast", "Identity") and node.output[0] not in seen:
                    seen.add(node.output[0])
                    frontier.append(node.output[0])
                elif node.op_type == "Gather" and position == 1 and node.input[0] in rows:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if axis == 0:
                        found[name] = min(found.get(name, rows[node.input[0]]), rows[node.input[0]])
    return found


def converted_fields(model: onnx.ModelProto, source_bytes: bytes) -> dict[str, Any]:
    """Manifest fields of a model converted earlier, whose pipeline is not known any more."""
    return {
        "source_sha256": sha256(source_bytes),
        MetaKey.precision.value: ir.get_metadata(model).get(MetaKey.precision.value, "fp32"),
        "pipeline": [],
    }


def in_memory(path: str | os.PathLike, model: onnx.ModelProto, manifest_fields: dict[str, Any]) -> Artifact:
    """The artifact `write_artifact` would write, without writing it (`path` names its source)."""
    model_bytes = model.SerializeToString()
    manifest = build_manifest(model, model_sha256=sha256(model_bytes), **manifest_fields)
    return Artifact(Path(path), manifest, model_bytes)


def write_artifact(path: str | os.PathLike, model: onnx.ModelProto, manifest_fields: dict[str, Any]) -> Path:
    """Write the artifact atomically; `manifest_fields` are passed to `build_manifest`."""
    path = Path(path)
    size = model.ByteSize()
    if size > ir.PROTOBUF_LIMIT:
        raise ArtifactError(
            f"the model is {size} bytes, over protobuf's {ir.PROTOBUF_LIMIT}-byte (2 GB) limit; an artifact cannot hold it, use the .onnx file and its external data"
        )
    model_bytes = model.SerializeToString()
    manifest = build_manifest(model, model_sha256=sha256(model_bytes), **manifest_fields)
    manifest_bytes = json.dumps(manifest, indent=2).encode()

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST_MEMBER, manifest_bytes)
            archive.writestr(DIGEST_MEMBER, sha256(manifest_bytes))
            archive.writestr(MODEL_MEMBER, model_bytes)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.atomic_write(path, write)
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact '{path}' ({exc.strerror or exc}); check --output_dir and free space") from exc
    return path


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact; any inconsistency raises `ArtifactError`.

    In order: the file is a zip archive; its members are exactly the three expected names (no
    absolute or `..` paths, no duplicates, nothing extra); their declared sizes fit the expansion
    budget; each is read into memory, at most the budget whatever its header says; the manifest
    checksum, the manifest's format and version, and the model checksum match; the model parses and
    is self-contained (no external data). Nothing is extracted to disk, imported or unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact '{path}' does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"'{path}' is not a poprt-lite artifact ({one_line(exc, with_type=False)}); compile one with --export_popef") from None
    with archive:
        infos = archive.infolist()
        _check_members(path, [info.filename for info in infos])
        budget = MAX_EXPANSION * path.stat().st_size
        if sum(info.file_size for info in infos) > budget:
            raise ArtifactError(f"artifact '{path}' expands to far more than its size; refusing it (zip bomb?)")
        try:
            data = {name: _read_bounded(archive, name, budget) for name in MEMBERS}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
            # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method
            raise ArtifactError(f"artifact '{path}' is corrupt ({one_line(exc, with_type=False)}); re-export it") from None
    if sha256(data[MANIFEST_MEMBER]) != data[DIGEST_MEMBER].decode(errors="replace").strip():
        raise ArtifactError(f"artifact '{path}': manifest checksum mismatch (corrupted or edited); re-export it")
    try:
        manifest = json.loads(data[MANIFEST_MEMBER])
    except (ValueError, RecursionError):
        raise ArtifactError(f"artifact '{path}': manifest is not valid JSON; re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"artifact '{path}' is not a poprt-lite artifact (format {found!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact '{path}' has format version {version!r}; this poprt-lite reads version {FORMAT_VERSION}, re-export it"
        )
    if sha256(data[MODEL_MEMBER]) != manifest.get("model_sha256"):
        raise ArtifactError(f"artifact '{path}': model checksum mismatch (corrupted or tampered); re-export it")
    _check_model(path, data[MODEL_MEMBER])
    return Artifact(path=path, manifest=manifest, model_bytes=data[MODEL_MEMBER])


def _check_members(path: Path, names: list[str]) -> None:
    unsafe = [n for n in names if n.startswith(("/", "\\")) or ".." in n.replace("\\", "/").split("/") or ":" in n]
    if unsafe:
        raise ArtifactError(f"artifact '{path}' has a member with an unsafe path {unsafe[0]!r} (absolute or with '..'); refusing it")
    duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if duplicates:
        raise ArtifactError(f"artifact '{path}' holds member {duplicates[0]!r} more than once; refusing it")
    extra, missing = sorted(set(names) - set(MEMBERS)), sorted(set(MEMBERS) - set(names))
    if extra:
        raise ArtifactError(f"artifact '{path}' has unexpected members {extra}; it was not written by poprt-lite")
    if missing:
        raise ArtifactError(f"artifact '{path}' is missing members {missing}; it was not written by poprt-lite")


def _check_model(path: Path, model_bytes: bytes) -> None:
    """The model member must parse and hold all its weights: external data would make a runtime
    read files named by the artifact."""
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on the backend
        raise ArtifactError(f"artifact '{path}': {MODEL_MEMBER} is not a valid ONNX model; re-export it") from None
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            raise ArtifactError(
                f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} refers to external data; an artifact must be self-contained"
            )



def _read_bounded(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    # Read at most `limit` bytes whatever the header claims (a lying header is a zip bomb too).
    with archive.open(name) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"member {name} is larger than its header says")
    return data
