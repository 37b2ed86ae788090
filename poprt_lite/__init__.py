"""poprt-lite: compile transformer-encoder ONNX models for padding-free (packed) inference."""

__version__ = "0.1.0"

from poprt_lite.artifact import load_artifact  # noqa: E402
from poprt_lite.compiler import CompileOptions, compile  # noqa: E402
from poprt_lite.converter import Converter  # noqa: E402  (PopRT's `poprt.Converter`)
from poprt_lite.passes import Pass, get_registered_passes  # noqa: E402  (PopRT's `poprt.Pass`)

__all__ = ["CompileOptions", "Converter", "Pass", "compile", "get_registered_passes", "load_artifact", "__version__"]
