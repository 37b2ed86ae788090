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

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

import poprt_lite
from poprt_lite import ir
from poprt_lite.errors import ArtifactError

FORMAT = "poprt-lite-artifact"
FORMAT_VERSION = 1
DEFAULT_NAME = "executable.popef"
MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER = "model.onnx", "manifest.json", "manifest.sha256"
MEMBERS = (MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER)
# A member may expand to at most this multiple of the archive size (zip-bomb guard); members are
# stored uncompressed, so honest artifacts expand by ~1x.
MAX_EXPANSION = 4

# Roles of inputs that poprt-lite passes understand; other inputs are "data".
DEFAULT_ROLES = {
    "input_ids": "dynamic_input",
    "attention_mask": "attention_mask",
    "token_type_ids": "token_type_ids",
    "position_ids": "position_ids",
    "unpack_info": "unpack_info",
}


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
    pack = json.loads(meta["pack"]) if "pack" in meta else None

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor_type = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim],
        }

    inputs = [
        {**describe(v), "role": meta.get(f"role.{v.name}", DEFAULT_ROLES.get(v.name, "data"))} for v in model.graph.input
    ]
    outputs = [{**describe(v), "layout": meta.get(f"layout.{v.name}", "padded")} for v in model.graph.output]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "poprt_lite_version": poprt_lite.__version__,
        "source_model_sha256": source_sha256,
        "model_sha256": model_sha256,
        "precision": precision,
        "pipeline": pipeline,
        "inputs": inputs,
        "outputs": outputs,
        "pack": pack,
        "custom_op_domains": sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}),
        "position_offset": int(meta.get("position_offset", 0)),
        "vocab_size": int(meta["vocab_size"]) if "vocab_size" in meta else None,
    }


def write_artifact(path: str | os.PathLike, model: onnx.ModelProto, manifest_fields: dict[str, Any]) -> Path:
    """Write the artifact atomically; `manifest_fields` are passed to `build_manifest`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_bytes = model.SerializeToString()
    manifest = build_manifest(model, model_sha256=sha256(model_bytes), **manifest_fields)
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    tmp = ir.temporary_sibling(path)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST_MEMBER, manifest_bytes)
            archive.writestr(DIGEST_MEMBER, sha256(manifest_bytes))
            archive.writestr(MODEL_MEMBER, model_bytes)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact; any inconsistency raises `ArtifactError`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact '{path}' does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(f"'{path}' is not a poprt-lite artifact ({exc}); compile one with --export_popef") from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if sorted(names) != sorted(MEMBERS):
            odd = sorted(set(names) ^ set(MEMBERS))
            raise ArtifactError(f"artifact '{path}' has unexpected or missing members {odd}; it was not written by poprt-lite")
        budget = MAX_EXPANSION * path.stat().st_size
        if sum(info.file_size for info in infos) > budget:
            raise ArtifactError(f"artifact '{path}' expands to far more than its size; refusing it (zip bomb?)")
        try:
            data = {name: _read_bounded(archive, name, budget) for name in MEMBERS}
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ArtifactError(f"artifact '{path}' is corrupt ({exc}); re-export it") from None
    if sha256(data[MANIFEST_MEMBER]) != data[DIGEST_MEMBER].decode(errors="replace").strip():
        raise ArtifactError(f"artifact '{path}': manifest checksum mismatch (corrupted or edited); re-export it")
    try:
        manifest = json.loads(data[MANIFEST_MEMBER])
    except ValueError:
        raise ArtifactError(f"artifact '{path}': manifest is not valid JSON; re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"artifact '{path}' is not a poprt-lite artifact (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact '{path}' has format version {manifest.get('format_version')!r}; this poprt-lite reads version {FORMAT_VERSION}, re-export it"
        )
    if sha256(data[MODEL_MEMBER]) != manifest.get("model_sha256"):
        raise ArtifactError(f"artifact '{path}': model checksum mismatch (corrupted or tampered); re-export it")
    return Artifact(path=path, manifest=manifest, model_bytes=data[MODEL_MEMBER])


def _read_bounded(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    # Read at most `limit` bytes whatever the header claims (a lying header is a zip bomb too).
    with archive.open(name) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"member {name} is larger than its header says")
    return data
