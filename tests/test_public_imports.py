"""The import paths the README and examples/ document keep working after the move into layer folders."""

from __future__ import annotations

import subprocess
import sys

import poprt_lite


def test_documented_paths_import_in_a_fresh_interpreter():
    # A fresh interpreter: `from poprt_lite.embed import ...` must work as a user's first import.
    code = "\n".join([
        "from poprt_lite.embed import Embedder, load_tokenizer",
        "from poprt_lite import packing_utils, runtime",
        "from poprt_lite.backend import get_session",
        "from poprt_lite.compiler import Compiler, CompilerOptions, CompileOptions",
        "from poprt_lite.converter import Converter",
        "from poprt_lite.runtime import ModelRunner, PackAlgorithm, PackRunner, PackRunnerConfig",
        "from poprt_lite import CompileOptions, Converter, Pass, compile, get_registered_passes, load_artifact",
        "import poprt_lite.embed, poprt_lite.backend, poprt_lite.converter, poprt_lite.packing_utils",
        "print(Embedder.__module__, get_session.__module__, Converter.__module__, packing_utils.__name__, Compiler.__module__)",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [
        "poprt_lite.apps.embed", "poprt_lite.compat.backend", "poprt_lite.compat.converter",
        "poprt_lite.runtime.packing_utils", "poprt_lite.compiler",
    ]


def test_old_paths_are_the_moved_modules_not_copies():
    from poprt_lite.apps import embed
    from poprt_lite.compat import backend, converter
    from poprt_lite.runtime import packing_utils

    assert sys.modules["poprt_lite.embed"] is poprt_lite.embed is embed
    assert sys.modules["poprt_lite.backend"] is poprt_lite.backend is backend
    assert sys.modules["poprt_lite.converter"] is poprt_lite.converter is converter
    assert sys.modules["poprt_lite.packing_utils"] is poprt_lite.packing_utils is packing_utils
    assert poprt_lite.Converter is converter.Converter
