"""The pack modes' descriptors (poprt_lite/runtime/modes.py): a mode registered from this file alone
compiles and serves like a built-in one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import poprt_lite
from poprt_lite import runtime
from poprt_lite.errors import PoprtError
from poprt_lite.runtime import PackRunnerConfig, modes
from poprt_lite.runtime.layouts import TokenStream
from poprt_lite.runtime.modes import ModeDescriptor
from poprt_lite.vocab import Layout, PackMode

from conftest import VOCAB, model_path

# A variant of token_stream (its pass and its host layout) whose keys all have defaults of its own.
TOY = ModeDescriptor(
    name="toy_stream",
    pass_name="token_stream_packing",
    layout=TokenStream,
    needed=("max_valid_num", "segment_max_size", "max_tokens"),
    defaults={"max_valid_num": 3, "segment_max_size": 16, "max_tokens": 24},
    static=False,
    token_output=Layout.stream,
    label="toy stream",
)
MODEL = "bert_meanpool"


@pytest.fixture
def toy_mode():
    modes.register(TOY)
    yield TOY
    modes.unregister(TOY.name)


def test_built_in_modes_are_the_pack_mode_words_in_order():
    assert modes.names() == tuple(PackMode)
    assert [m.pass_name for m in modes.registered()] == ["pack_unpack_repack", "attention_mask_packing", "token_stream_packing", "token_stream_loop_packing"]
    assert [m.name for m in modes.registered() if m.static] == [PackMode.unpack_repack, PackMode.attention_mask]
    assert [m.name for m in modes.registered() if m.one_row] == [PackMode.attention_mask]


def test_unknown_and_duplicate_modes_are_refused():
    with pytest.raises(PoprtError) as err:
        modes.get("toy_stream")
    assert str(err.value) == "pack mode must be one of unpack_repack, attention_mask, token_stream, token_stream_loop, got 'toy_stream'"
    with pytest.raises(PoprtError) as err:
        modes.register(modes.TOKEN_STREAM)
    assert str(err.value) == "pack mode 'token_stream' is registered already"


def test_a_registered_mode_compiles_with_its_defaults_and_runs_through_runtime_runner(toy_mode, tmp_path):
    options = poprt_lite.CompileOptions(pack_args={"mode": "toy_stream"})  # every other key: the toy's default
    result = poprt_lite.compile(model_path(MODEL), tmp_path / "model.onnx", output_dir=tmp_path, export_popef=True, options=options)
    manifest = poprt_lite.load_artifact(result.artifact).manifest
    assert manifest["pack"] == {"mode": "toy_stream", "max_valid_num": 3, "segment_max_size": 16, "max_tokens": 24}

    rng = np.random.default_rng(0)
    lengths = [16, 5, 9, 1, 12, 16, 3]
    requests = [
        {"input_ids": rng.integers(3, VOCAB, n), "token_type_ids": rng.integers(0, 2, n), "attention_mask": np.ones(n, np.int64)}
        for n in lengths
    ]
    original = ort.InferenceSession(str(model_path(MODEL)), providers=["CPUExecutionProvider"])
    names = [o.name for o in original.get_outputs()]
    wanted = [dict(zip(names, original.run(None, {k: v[None].astype(np.int64) for k, v in r.items()}), strict=True)) for r in requests]

    with runtime.Runner(result.artifact, PackRunnerConfig(timeout_microseconds=1000)) as runner:
        assert (runner.mode, runner.batch_size, runner.seq_len, runner.max_valid_num) == ("toy_stream", 1, 24, 3)
        online = [f.result(timeout=60) for f in [runner.execute_async(r) for r in requests]]
        stats = runner.stats
    assert stats.requests == len(lengths) and stats.tokens == sum(lengths)
    offline = runtime.Runner(result.artifact).run_requests(requests)
    for want, got_online, got_offline in zip(wanted, online, offline, strict=True):
        for name in names:
            np.testing.assert_allclose(got_online[name], want[name][0], atol=1e-4)
            np.testing.assert_allclose(got_offline[name], want[name][0], atol=1e-4)


def test_a_registered_mode_is_refused_what_its_descriptor_refuses(toy_mode):
    with pytest.raises(PoprtError) as err:
        poprt_lite.CompileOptions(input_shape={"input_ids": (2, 16)}, pack_args={"mode": "toy_stream"})
    assert str(err.value) == (
        "input_shape pins a static shape, but pack_args mode=toy_stream keeps the token dimension dynamic; drop input_shape"
    )
