"""`poprt-lite bench --small` end to end on the bundled tiny BERT-QA export (no torch, no speed assertion)."""

from __future__ import annotations

import json
import sys

from poprt_lite.cli.main import main
from tests.conftest import TESTDATA

MODES = [
    "padded",
    "offline_dynamic_per_request",
    "offline_dynamic_sorted",
    "offline_unpack_repack",
    "offline_attention_mask",
    "offline_token_stream",
    "offline_token_stream_loop",
    "online_dynamic_per_request",
    "online_dynamic_batching",
    "online_unpack_repack",
    "online_attention_mask_first_fit",
    "online_attention_mask_next_fit",
    "online_token_stream",
    "online_token_stream_loop",
]
DYNAMIC = [m for m in MODES if "_dynamic_" in m]
PACKED_ONLINE = ["online_unpack_repack", "online_attention_mask_first_fit", "online_attention_mask_next_fit", "online_token_stream", "online_token_stream_loop"]


def check_run(data: dict, requests: int) -> dict:
    """What every run must show, whatever the workload: each mode ran every request, and every
    request's outputs equal the original model's on that request alone."""
    modes = {m["name"]: m for m in data["modes"]}
    assert list(modes) == MODES
    assert data["workload"]["requests"] == requests
    for name, m in modes.items():
        assert m["requests"] == requests
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > 0
        assert 0 < m["latency_mean_ms"] <= m["latency_p99_ms"] * 1.0001
        assert 0 < m["packing_efficiency"] <= 1
        assert m["speedup"] > 0 and m["vs_dynamic"] > 0
        assert m["online"] == name.startswith("online_") and m["dynamic"] == (name in DYNAMIC)
        for output, mae in m["mae"].items():  # every request's real tokens, against the original alone
            assert mae < 1e-4, (name, output, mae)
            assert m["mae_max"][output] < 1e-4, (name, output)
    # the reference is the original model run on each request alone
    assert modes["offline_dynamic_per_request"]["mae"] == {"start_logits": 0.0, "end_logits": 0.0}
    for online in (False, True):  # each row's ratio is to the best dynamic mode of its kind
        kind = [m for m in modes.values() if m["online"] == online]
        best = max((m for m in kind if m["dynamic"]), key=lambda m: m["samples_per_s"])
        for m in kind:
            assert m["vs_dynamic_mode"] == best["name"]
            assert abs(m["vs_dynamic"] - m["samples_per_s"] / best["samples_per_s"]) < 1e-9
    # each request alone: one request per batch, no padding; sorted batches pad to the longest only
    for name in ("offline_dynamic_per_request", "online_dynamic_per_request"):
        assert modes[name]["batches"] == requests and modes[name]["packing_efficiency"] == 1.0
    assert modes["offline_dynamic_sorted"]["packing_efficiency"] > modes["padded"]["packing_efficiency"]
    # packed batches hold more requests than padded ones
    assert modes["offline_attention_mask"]["requests_per_batch"] > modes["padded"]["requests_per_batch"]
    assert modes["offline_token_stream"]["requests_per_batch"] > modes["padded"]["requests_per_batch"]
    # a token stream runs its real tokens only
    for name in ("offline_token_stream", "online_token_stream"):
        assert modes[name]["packing_efficiency"] == 1.0
    for name in PACKED_ONLINE + ["online_dynamic_batching"]:
        assert 0 <= modes[name]["batches_by_timeout"] <= modes[name]["batches"]
    for name in PACKED_ONLINE:
        assert 0 <= modes[name]["overtakes"] < modes[name]["requests"]
    return modes


def test_bench_small_preset(tmp_path, capsys):
    had_torch = "torch" in sys.modules
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"),
        "--work_dir", str(tmp_path / "work"), "--json", str(out), "--plot", str(tmp_path / "bench.png"), "--no_progress",
    ])
    assert code == 0, capsys.readouterr().err
    assert had_torch or "torch" not in sys.modules  # the smoke run never needs torch

    stdout = capsys.readouterr().out
    assert "offline AttentionMask" in stdout and "vs dynamic" in stdout

    data = json.loads(out.read_text())
    assert data["config"]["workload"] == "seed"
    modes = check_run(data, 8 * 4)
    assert modes["online_dynamic_batching"]["requests_per_batch"] <= 4  # batch_size of the --small preset
    host = data["host_packing"]
    assert set(host) == {"unpack_repack", "attention_mask", "token_stream", "token_stream_loop"}
    ops = {(o["model"], o["op"]) for o in data["op_costs"]["ops"]}
    assert {("unpack_repack", "Unpack"), ("unpack_repack", "Repack"), ("attention_mask", "AttentionMask")} <= ops
    assert "| offline AttentionMask |" in data["markdown_table"]
    png = (tmp_path / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_bench_queries_workload(tmp_path, capsys):
    out = tmp_path / "queries.json"
    code = main([
        "bench", "--workload", "queries", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"),
        "--work_dir", str(tmp_path / "work"), "--json", str(out), "--no_progress", "--no_op_costs",
    ])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["config"]["workload"] == "queries"
    assert data["workload"]["lengths"] == "clip(int32(Normal(6, 3)), 3, 32), numpy seed 2023"
    modes = check_run(data, 16 * 4)
    assert data["workload"]["mean_length"] < 8
    # rows, not max_valid_num (48), limit a batch: no packed batch comes near the count
    for name in ("offline_attention_mask", "online_attention_mask_first_fit"):
        assert modes[name]["requests_per_batch"] < 48 / 2


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    from poprt_lite.bench import measure

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    ran = []
    monkeypatch.setattr(measure, "run_benchmark", lambda *args: ran.append(args))
    code = main(["bench", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"),
                 "--work_dir", str(tmp_path), "--plot", str(tmp_path / "b.png"), "--no_progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --plot needs matplotlib; pip install 'poprt-lite[plot]' or drop --plot"
    )
    assert ran == [] and not list(tmp_path.iterdir())


def test_bench_rejects_bad_options(tmp_path, capsys):
    code = main(["bench", "--small", "--model", str(tmp_path / "missing.onnx"), "--no_progress"])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    code = main(["bench", "--small", "--model", str(TESTDATA / "bert_qa_torchscript.onnx"), "--modes", "padded,bogus",
                 "--work_dir", str(tmp_path), "--no_progress"])
    assert code == 2
    assert "unknown mode 'bogus'" in capsys.readouterr().err
