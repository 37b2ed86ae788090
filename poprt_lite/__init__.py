"""poprt-lite: compile transformer-encoder ONNX models for padding-free (packed) inference."""

__version__ = "0.1.0"

from poprt_lite.artifact import load_artifact  # noqa: E402
from poprt_lite.compiler import CompileOptions, compile  # noqa: E402

__all__ = ["CompileOptions", "compile", "load_artifact", "__version__"]
