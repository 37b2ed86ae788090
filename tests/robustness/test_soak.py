"""The PackRunner load / soak test (benchmarks/soak.py), reduced.

The full run (`python benchmarks/soak.py`: 64 clients x 20,000 requests per mode on a 16x128
artifact) takes a few minutes; here the slow suite runs it with fewer requests and a smaller
artifact, and the default suite runs a smoke version (one mode, no close phases) so the script
keeps working. Both fail unless every check of the script passes: zero lost, zero mismatched, zero
hung threads, the injected failure fails exactly its own batch and the next batch succeeds, RSS
growth after warm-up bounded, and close() under load returns within the batches it must wait for.
"""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from conftest import ROOT
from poprt_lite.vocab import PackMode

SMALL = ["--batch", "4", "--seq", "64", "--max_valid_num", "12", "--segment_max_size", "64"]


@pytest.fixture(scope="module")
def soak(request):
    script = ROOT / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("poprt_lite_soak", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def run(soak, capsys, *argv: str) -> str:
    code = soak.main(list(argv))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASSED: zero lost, zero mismatched, zero hung" in out
    return out


@pytest.mark.parametrize("mode", [PackMode.attention_mask.value, PackMode.token_stream.value])
def test_soak_smoke(soak, capsys, mode):
    out = run(soak, capsys, "--requests", "400", "--clients", "8", *SMALL, "--modes", mode, "--no_close",
              "--time_limit", "60")
    assert f"[soak: {mode} (first_fit)]" in out
    assert re.search(r"lost 0, mismatched 0, failed \d+, hung threads 0", out)
    assert "next batch succeeded: True" in out


@pytest.mark.slow
def test_soak_both_modes_with_close_under_load(soak, capsys):
    out = run(soak, capsys, "--requests", "4000", "--clients", "32", *SMALL, "--time_limit", "120",
              "--close_slack_ms", "100")
    for mode in PackMode:
        assert f"[soak: {mode} (first_fit)]" in out
        assert f"[close() (drain) under load: {mode} (first_fit)]" in out
        assert f"[close(cancel_pending=True) under load: {mode} (first_fit)]" in out
    assert out.count("next batch succeeded: True") == len(PackMode)
