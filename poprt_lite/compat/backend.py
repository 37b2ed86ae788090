"""`get_session`, PopRT's `poprt.backend.get_session`, on onnxruntime.

```python
from poprt_lite.backend import get_session

sess = get_session("bert_bs16_sl256.onnx", 1, "poprt").load()           # compile in memory
get_session("bert_pack.onnx", 1, "poprt", output_dir=d, export_popef=True).load()  # d/executable.popef
outputs = sess.run(["start_logits", "end_logits"], feeds)                   # list of arrays
```

`model_path` is either a model converted by poprt-lite (an ONNX file; its manifest is built from the
model's metadata, nothing is converted again) or an artifact (`executable.popef`), which is loaded.
The session is a `runtime.ModelRunner`: every feed is checked (name, dtype, shape) before running
and int32/int64 ids are cast to the model's type.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from poprt_lite.compiler import servable
from poprt_lite.errors import PoprtError
from poprt_lite.ir import artifact
from poprt_lite.runtime.model_runner import ModelRunner

BACKENDS = ("poprt", "poprt-lite", "poprt_lite", "onnxruntime", "cpu")


@dataclass
class Session:
    """A model to be loaded (`get_session`): `load()` returns the runnable session (a ModelRunner)."""

    model_path: Path
    output_dir: Path | None
    export_popef: bool
    threads: int
    artifact_path: Path | None = field(default=None, init=False)  # the artifact written or loaded by load()

    def load(self) -> ModelRunner:
        """Build (or load) the artifact and return a session with `.run(output_names, feeds)`."""
        if not self.model_path.is_file():
            raise PoprtError(f"model '{self.model_path}' does not exist")
        loaded = artifact.load_model_or_artifact(self.model_path)
        if isinstance(loaded, artifact.Artifact):
            if self.export_popef:
                target = self._target()
                if target.resolve() != self.model_path.resolve():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.model_path, target)
                self.artifact_path = target
            return ModelRunner(loaded, threads=self.threads)
        fields = artifact.converted_fields(loaded, self.model_path.read_bytes())
        if self.export_popef:
            self.artifact_path = servable.export_artifact(self._target(), loaded, fields)
            return ModelRunner(self.artifact_path, threads=self.threads)
        return ModelRunner(artifact.in_memory(self.model_path, loaded, fields), threads=self.threads)

    def _target(self) -> Path:
        if self.output_dir is None:
            raise PoprtError("export_popef=True needs output_dir, where executable.popef is written")
        return self.output_dir / artifact.DEFAULT_NAME


def get_session(
    model_path: str | os.PathLike,
    num_devices: int = 1,
    backend_name: str = "poprt",
    output_dir: str | os.PathLike | None = None,
    export_popef: bool = False,
    threads: int = 0,
) -> Session:
    """PopRT's `get_session(model_path, num_devices, backend_name, output_dir, export_popef)`.

    With `export_popef=True`, `load()` also writes the artifact `output_dir/executable.popef`
    (for `runtime.Runner`). `threads` is onnxruntime's intra-op thread count (0: every core).
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise PoprtError(f"num_devices must be a positive integer, got {num_devices!r}")
    if num_devices != 1:
        raise PoprtError(f"num_devices={num_devices}: poprt-lite runs on one CPU device; pass 1")
    if backend_name not in BACKENDS:
        raise PoprtError(f"unknown backend '{backend_name}'; use one of {', '.join(BACKENDS)}")
    return Session(Path(model_path), Path(output_dir) if output_dir is not None else None, export_popef, threads)
