"""The package root shows the layers: every module but the shared three lives in its layer's folder."""

from __future__ import annotations

from pathlib import Path

import poprt_lite

PACKAGE = Path(poprt_lite.__file__).parent


def test_root_holds_only_the_public_api_errors_and_vocabulary():
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py", "errors.py", "vocab.py"]
