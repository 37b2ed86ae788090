"""poprt-lite: compile transformer-encoder ONNX models for padding-free (packed) inference."""

__version__ = "0.1.0"

import sys  # noqa: E402

from poprt_lite.compat.converter import Converter  # noqa: E402  (PopRT's `poprt.Converter`)
from poprt_lite.compiler import CompileOptions, compile  # noqa: E402
from poprt_lite.ir.artifact import load_artifact  # noqa: E402
from poprt_lite.passes import Pass, get_registered_passes  # noqa: E402  (PopRT's `poprt.Pass`)

# Documented import paths of modules that now live in their layer's folder (docs/architecture.md):
# `poprt_lite.embed` is the very module `poprt_lite.apps.embed`, not a copy.
from poprt_lite.apps import embed  # noqa: E402
from poprt_lite.compat import backend, converter  # noqa: E402
from poprt_lite.runtime import packing_utils  # noqa: E402

for _module in (embed, backend, converter, packing_utils):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module
del _module

__all__ = ["CompileOptions", "Converter", "Pass", "compile", "get_registered_passes", "load_artifact", "__version__"]
