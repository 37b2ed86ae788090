"""The compiled artifact: one file holding the converted model and an executable-style manifest.

The file is a zip archive (named `executable.popef` by default, for drop-in compatibility with PopRT
scripts) with exactly three members:

- `model.onnx`: the converted model, with custom-op function bodies attached;
- `manifest.json`: everything a runtime needs to drive the model (see `build_manifest`);
- `manifest.sha256`: the sha256 of `manifest.json`, so an edited manifest is detected.

A model over protobuf's 2 GB limit adds a fourth, `model.onnx.data`: its weights, stored
uncompressed, which the tensors of `model.onnx` refer to as external data (that member, and
nothing else) and whose sha256 the manifest holds (`weights_sha256`).

Loading verifies the checksums and the format version before anything is parsed further, reads
the small members into memory and maps the weights member (nothing is extracted to disk), and
never imports or unpickles anything. `runtime.session.artifact_session` gives the model its
weights from the mapping.

This module is the format only: whether a packed model can be served is the compiler's check
(compiler/servable.py), which runs before anything is written.
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from poprt_lite import __version__, ir, vocab
from poprt_lite.ir import wire
from poprt_lite.errors import ArtifactError, PoprtError, one_line, option
from poprt_lite.vocab import MetaKey

FORMAT = "poprt-lite-artifact"
FORMAT_VERSION = 1
DEFAULT_NAME = "executable.popef"
MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER = "model.onnx", "manifest.json", "manifest.sha256"
MEMBERS = (MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER)
WEIGHTS_MEMBER = "model.onnx.data"  # only in artifacts of models over protobuf's 2 GB limit
EXTERNAL_DATA_KEYS = {"location", "offset", "length"}
# A member may expand to at most this multiple of the archive size (zip-bomb guard); members are
# stored uncompressed, so honest artifacts expand by ~1x.
MAX_EXPANSION = 4

@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    model_bytes: bytes
    weights: memoryview | None = None  # the mapped weights member, when the model is over 2 GB

    def model(self) -> onnx.ModelProto:
        """The model member; with a weights member its large tensors refer to that member."""
        return onnx.load_from_string(self.model_bytes)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in blocks (the file is never held in memory)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def build_manifest(
    model: onnx.ModelProto,
    *,
    source_sha256: str,
    model_sha256: str,
    precision: str,
    pipeline: list[dict[str, Any]],
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """Describe `model` for a runtime: interface with roles and layouts, packing, offsets (and the
    checksum of the weights member, when the artifact has one)."""
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
        "poprt_lite_version": __version__,
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
        MetaKey.rows.value: vocab.int_of(meta, MetaKey.rows) or None,
    } | ({"weights_sha256": weights_sha256} if weights_sha256 is not None else {})


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


def described_form(model: ir.Model) -> onnx.ModelProto:
    """`model` with every initializer's name, type and shape but its weights in WEIGHTS_MEMBER: what
    the manifest describes, without a copy of the weights."""
    return ir.external_form(*model.layout(), WEIGHTS_MEMBER)


def manifest_only(model: onnx.ModelProto, precision: str = "fp32") -> Artifact:
    """The artifact `model` would make, with its manifest and without its model bytes: what a runner
    would read of it (its packed interface), before anything is written."""
    manifest = build_manifest(model, source_sha256="", model_sha256="", precision=precision, pipeline=[])
    return Artifact(Path("<converted model>"), manifest, b"")


def load_model_or_artifact(path: str | os.PathLike) -> Artifact | onnx.ModelProto:
    """`path` read as an artifact when it is one (a zip archive), else as an ONNX model; either way
    a bad file raises a one-line `PoprtError`. The one reader of "a model or an artifact"."""
    path = Path(path)
    if not path.is_file():
        raise PoprtError(f"'{path}' does not exist or is not a file")
    return load_artifact(path) if zipfile.is_zipfile(path) else ir.load_model(path)


def in_memory(path: str | os.PathLike, model: onnx.ModelProto, manifest_fields: dict[str, Any]) -> Artifact:
    """The artifact `write_artifact` would write, without writing it (`path` names its source)."""
    model_bytes = model.SerializeToString()
    manifest = build_manifest(model, model_sha256=sha256(model_bytes), **manifest_fields)
    return Artifact(Path(path), manifest, model_bytes)


def write_artifact(path: str | os.PathLike, model: onnx.ModelProto | ir.Model, manifest_fields: dict[str, Any]) -> Path:
    """Write the artifact atomically, each weight streamed into it; `manifest_fields` are passed
    to `build_manifest`. A model over protobuf's 2 GB limit keeps its weights in WEIGHTS_MEMBER.
    Nothing is checked beyond the format: the compiler's `export_artifact` checks servability first."""
    path = Path(path)
    working = model if isinstance(model, ir.Model) else ir.Model.from_proto(model)
    proto, apart = working.layout()
    single = wire.model_size(proto, apart) <= ir.PROTOBUF_LIMIT
    described = ir.external_form(proto, apart, WEIGHTS_MEMBER)  # every initializer's name, type and shape

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            checksums = {}
            if single:
                checksums["model_sha256"] = _write_member(archive, MODEL_MEMBER, lambda f: ir.write_model(proto, apart, f))
            else:
                model_bytes = described.SerializeToString()
                archive.writestr(MODEL_MEMBER, model_bytes)
                checksums["model_sha256"] = sha256(model_bytes)
                checksums["weights_sha256"] = _write_member(archive, WEIGHTS_MEMBER, lambda f: ir.write_external_data(apart, f))
            manifest = build_manifest(described, **checksums, **manifest_fields)
            manifest_bytes = json.dumps(manifest, indent=2).encode()
            archive.writestr(MANIFEST_MEMBER, manifest_bytes)
            archive.writestr(DIGEST_MEMBER, sha256(manifest_bytes))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.atomic_write(path, write)
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact '{path}' ({exc.strerror or exc}); check {option('output_dir')} and free space") from exc
    return path


def _write_member(archive: zipfile.ZipFile, name: str, write) -> str:
    """Stream a member (stored, zip64 when large) through `write(stream)`; returns its sha256."""
    digest = hashlib.sha256()
    with archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as member:
        write(_Hashing(member, digest))
    return digest.hexdigest()


class _Hashing:
    """A writable stream that hashes what goes through it."""

    def __init__(self, stream, digest) -> None:
        self.stream, self.digest = stream, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.stream.write(data)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact; any inconsistency raises `ArtifactError`.

    In order: the file is a zip archive; its members are exactly the three expected names (no
    absolute or `..` paths, no duplicates, nothing extra); their declared sizes fit the expansion
    budget; each is read into memory, at most the budget whatever its header says; the manifest
    checksum, the manifest's format and version, and the model checksum match; the model parses and
    is self-contained: no external data, except, with a weights member (stored, not compressed,
    mapped read-only and checked against `weights_sha256`), initializers lying inside that member
    and nothing else. Nothing is extracted to disk, imported or unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact '{path}' does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"'{path}' is not a poprt-lite artifact ({one_line(exc, with_type=False)}); compile one with {option('export_popef')}") from None
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
        weights_info = next((info for info in infos if info.filename == WEIGHTS_MEMBER), None)
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
    weights = None
    if weights_info is not None:
        weights = _map_member(path, weights_info)
        if sha256(weights) != manifest.get("weights_sha256"):
            raise ArtifactError(f"artifact '{path}': weights checksum mismatch (corrupted or tampered); re-export it")
    _check_model(path, data[MODEL_MEMBER], weights)
    return Artifact(path=path, manifest=manifest, model_bytes=data[MODEL_MEMBER], weights=weights)


def _check_members(path: Path, names: list[str]) -> None:
    unsafe = [n for n in names if n.startswith(("/", "\\")) or ".." in n.replace("\\", "/").split("/") or ":" in n]
    if unsafe:
        raise ArtifactError(f"artifact '{path}' has a member with an unsafe path {unsafe[0]!r} (absolute or with '..'); refusing it")
    duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if duplicates:
        raise ArtifactError(f"artifact '{path}' holds member {duplicates[0]!r} more than once; refusing it")
    extra, missing = sorted(set(names) - {*MEMBERS, WEIGHTS_MEMBER}), sorted(set(MEMBERS) - set(names))
    if extra:
        raise ArtifactError(f"artifact '{path}' has unexpected members {extra}; it was not written by poprt-lite")
    if missing:
        raise ArtifactError(f"artifact '{path}' is missing members {missing}; it was not written by poprt-lite")


def _check_model(path: Path, model_bytes: bytes, weights: memoryview | None) -> None:
    """The model member must parse and hold all its weights, or, with a weights member, have its
    initializers' external data inside that member: any other external data would make a runtime
    read files named by the artifact."""
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on the backend
        raise ArtifactError(f"artifact '{path}': {MODEL_MEMBER} is not a valid ONNX model; re-export it") from None
    uses = external_data_helper.uses_external_data
    external = [t for t in model.graph.initializer if uses(t)]
    elsewhere = [t for t in external_data_helper._get_all_tensors(model) if uses(t) and t.name not in {e.name for e in external}]
    for tensor in [*elsewhere, *external]:
        if weights is None or tensor in elsewhere:
            raise ArtifactError(
                f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} refers to external data; an artifact must be self-contained"
            )
        entries = {e.key: e.value for e in tensor.external_data}
        if set(entries) - EXTERNAL_DATA_KEYS or entries.get("location") != WEIGHTS_MEMBER:
            raise ArtifactError(
                f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} refers to external data other than the member {WEIGHTS_MEMBER}; refusing it"
            )
        offset, length = _non_negative(entries.get("offset", "0")), _non_negative(entries.get("length", ""))
        if offset is None or length is None or length != ir._expected_bytes(tensor) or offset + length > weights.nbytes:
            raise ArtifactError(
                f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} does not lie inside {WEIGHTS_MEMBER} at the size of its type and shape; re-export it"
            )
    if weights is not None and not external:
        raise ArtifactError(f"artifact '{path}' has a member {WEIGHTS_MEMBER} that {MODEL_MEMBER} does not use; it was not written by poprt-lite")


def _non_negative(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


# The local file header of a zip member: its file name and extra field lengths are the last two of
# zipfile.structFileHeader's fields, and its data follows them.
_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)


def _map_member(path: Path, info: zipfile.ZipInfo) -> memoryview:
    """A stored (uncompressed, unencrypted) member's bytes, mapped read-only from the archive."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.compress_size != info.file_size:
        raise ArtifactError(f"artifact '{path}': member {info.filename} is compressed or encrypted; poprt-lite stores it plain, re-export it")
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        header = file.read(_LOCAL_HEADER.size)
        fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else None
        if fields is None or fields[0] != zipfile.stringFileHeader:
            raise ArtifactError(f"artifact '{path}' is corrupt (bad local header of {info.filename}); re-export it")
        name_length, extra_length = fields[-2], fields[-1]
        if file.read(name_length) != info.filename.encode():
            raise ArtifactError(f"artifact '{path}' is corrupt (local header of {info.filename} names another file); re-export it")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        size = os.fstat(file.fileno()).st_size
        if start + info.file_size > size or info.file_size == 0:
            raise ArtifactError(f"artifact '{path}' is corrupt ({info.filename} runs past the end of the file); re-export it")
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return memoryview(mapping)[start : start + info.file_size]


def _read_bounded(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    # Read at most `limit` bytes whatever the header claims (a lying header is a zip bomb too).
    with archive.open(name) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"member {name} is larger than its header says")
    return data
