"""`poprt-lite bench --small` end to end on the bundled tiny BERT-QA export (no torch, no speed assertion)."""

from __future__ import annotations

import json
import sys
import time

from poprt_lite.cli.main import main
from tests.conftest import TESTDATA

MODES = [
    "padded",
    "offline_unpack_repack",
    "offline_attention_mask",
    "online_unpack_repack",
    "online_attention_mask_first_fit",
    "online_attention_mask_next_fit",
]


def test_bench_small_preset(tmp_path, capsys):
    had_torch = "torch" in sys.modules
    out = tmp_path / "bench.json"
    start = time.perf_counter()
    code = main([
        "bench", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"),
        "--work_dir", str(tmp_path / "work"), "--json", str(out), "--plot", str(tmp_path / "bench.png"), "--no_progress",
    ])
    assert code == 0, capsys.readouterr().err
    assert time.perf_counter() - start < 60
    assert had_torch or "torch" not in sys.modules  # the smoke run never needs torch

    stdout = capsys.readouterr().out
    assert "offline AttentionMask" in stdout and "speed-up" in stdout

    data = json.loads(out.read_text())
    modes = {m["name"]: m for m in data["modes"]}
    assert list(modes) == MODES
    requests = data["workload"]["requests"]
    assert requests == 8 * 4
    for name, m in modes.items():
        assert m["requests"] == requests
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > 0
        assert 0 < m["latency_mean_ms"] <= m["latency_p99_ms"] * 1.0001
        assert 0 < m["packing_efficiency"] <= 1
        assert m["speedup"] > 0
        for output, mae in m["mae"].items():  # every request's real tokens, against the padded run
            assert mae < 1e-4, (name, output, mae)
            assert m["mae_max"][output] < 1e-4, (name, output)
    assert modes["padded"]["mae"] == {"start_logits": 0.0, "end_logits": 0.0}
    # packed batches hold more requests than padded ones
    assert modes["offline_attention_mask"]["requests_per_batch"] > modes["padded"]["requests_per_batch"]
    for name in ("online_unpack_repack", "online_attention_mask_first_fit", "online_attention_mask_next_fit"):
        assert 0 <= modes[name]["batches_by_timeout"] <= modes[name]["batches"]
        assert 0 <= modes[name]["overtakes"] < modes[name]["requests"]
    host = data["host_packing"]
    assert set(host) == {"unpack_repack", "attention_mask"}
    ops = {(o["model"], o["op"]) for o in data["op_costs"]["ops"]}
    assert {("unpack_repack", "Unpack"), ("unpack_repack", "Repack"), ("attention_mask", "AttentionMask")} <= ops
    assert "| offline AttentionMask |" in data["markdown_table"]
    png = (tmp_path / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    start = time.perf_counter()
    code = main(["bench", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"),
                 "--work_dir", str(tmp_path), "--plot", str(tmp_path / "b.png"), "--no_progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --plot needs matplotlib; pip install 'poprt-lite[plot]' or drop --plot"
    )
    assert time.perf_counter() - start < 5 and not list(tmp_path.iterdir())


def test_bench_rejects_bad_options(tmp_path, capsys):
    code = main(["bench", "--small", "--model", str(tmp_path / "missing.onnx"), "--no_progress"])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    code = main(["bench", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"), "--modes", "padded,bogus",
                 "--work_dir", str(tmp_path), "--no_progress"])
    assert code == 2
    assert "unknown mode 'bogus'" in capsys.readouterr().err
