"""Tools that look at models rather than convert them: `diff` and `inspect`."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from poprt_lite import ir
from poprt_lite.ir.artifact import load_artifact
from poprt_lite.errors import PoprtError


@dataclass
class LoadedModel:
    """A model read from an .onnx file, or from an artifact (then with its manifest)."""

    model: onnx.ModelProto
    manifest: dict[str, Any] | None = None


def load_model_or_artifact(path: str | os.PathLike) -> LoadedModel:
    """Read `path` as an artifact when it is a zip archive, else as an ONNX model; either way a
    bad file raises a one-line `PoprtError`."""
    path = Path(path)
    if not path.is_file():
        raise PoprtError(f"'{path}' does not exist or is not a file")
    if zipfile.is_zipfile(path):
        artifact = load_artifact(path)
        return LoadedModel(artifact.model(), artifact.manifest)
    return LoadedModel(ir.load_model(path))
