"""Host-side packing of requests: `pack_data`, `unpack_outputs`, `pad_data`."""

from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.runtime.packing_utils import RequestSpec, pack_data, pad_data, unpack_outputs


@dataclass
class Request:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    position_ids: np.ndarray | None
    input_len: int


def requests(lengths, token_types=True, position_ids=False):
    """Request k has input_ids 10*(k+1)+1, 10*(k+1)+2, ... and token type k % 2."""
    return [
        Request(
            input_ids=np.arange(n, dtype=np.int32) + 10 * (k + 1) + 1,
            attention_mask=np.ones(n, dtype=np.int32),
            token_type_ids=np.full(n, k % 2, dtype=np.int32) if token_types else None,
            position_ids=np.arange(n, dtype=np.int32) + 100 if position_ids else None,
            input_len=n,
        )
        for k, n in enumerate(lengths)
    ]


SMALL = [3, 4, 5, 2, 1, 3]


def test_unpack_repack_layout():
    batch = pack_data(requests(SMALL), 0, batch_size=2, seq_len=8, max_valid_num=6)
    np.testing.assert_array_equal(
        batch.data["input_ids"],
        [[11, 12, 13, 21, 22, 23, 24, 31], [32, 33, 34, 35, 41, 42, 51, 0]],
    )
    np.testing.assert_array_equal(
        batch.data["attention_mask"], [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]]
    )
    np.testing.assert_array_equal(
        batch.data["token_type_ids"], [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch.data["position_ids"], [[0, 1, 2, 0, 1, 2, 3, 0], [1, 2, 3, 4, 0, 1, 0, 0]]
    )
    assert list(batch.data) == ["input_ids", "attention_mask", "token_type_ids", "position_ids"]
    assert all(a.dtype == np.int32 and a.shape == (2, 8) for a in batch.data.values())
    assert batch.unpack_info.dtype == np.int32
    np.testing.assert_array_equal(batch.unpack_info, [3, 4, 5, 2, 1, 0])
    assert batch.specs == [
        RequestSpec(0, 0, 0, 3),
        RequestSpec(1, 0, 3, 4),
        RequestSpec(2, 0, 7, 5),
        RequestSpec(3, 1, 4, 2),
        RequestSpec(4, 1, 6, 1),
    ]
    assert batch.count == 5


def test_attention_mask_layout_first_fit():
    batch = pack_data(requests(SMALL), 0, 2, 8, 6, segment_num=1, across_rows=False, algorithm="first_fit")
    np.testing.assert_array_equal(
        batch.data["input_ids"],
        [[11, 12, 13, 21, 22, 23, 24, 51], [31, 32, 33, 34, 35, 41, 42, 0]],
    )
    np.testing.assert_array_equal(
        batch.data["attention_mask"], [[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 2, 2, 0]]
    )
    np.testing.assert_array_equal(
        batch.data["token_type_ids"], [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 0]]
    )
    np.testing.assert_array_equal(
        batch.data["position_ids"], [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 0]]
    )
    np.testing.assert_array_equal(batch.unpack_info, [3, 4, 5, 2, 1, 0])
    assert batch.specs == [
        RequestSpec(0, 0, 0, 3),
        RequestSpec(1, 0, 3, 4),
        RequestSpec(2, 1, 0, 5),
        RequestSpec(3, 1, 5, 2),
        RequestSpec(4, 0, 7, 1),
    ]
    assert batch.count == 5
    last = pack_data(requests(SMALL), 5, 2, 8, 6, across_rows=False)
    assert last.specs == [RequestSpec(5, 0, 0, 3)] and last.count == 6


def test_attention_mask_layout_next_fit_keeps_row_major_order():
    batch = pack_data(requests(SMALL), 0, 2, 8, 6, across_rows=False, algorithm="next_fit")
    np.testing.assert_array_equal(
        batch.data["attention_mask"], [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 3]]
    )
    assert [(s.row, s.offset) for s in batch.specs] == [(0, 0), (0, 3), (1, 0), (1, 5), (1, 7)]


def test_stops_at_max_valid_num():
    batch = pack_data(requests(SMALL), 1, 2, 8, max_valid_num=2, across_rows=False)
    assert [s.index for s in batch.specs] == [1, 2] and batch.count == 3
    np.testing.assert_array_equal(batch.unpack_info, [4, 5])


def test_position_ids_offset_given_and_missing_token_types():
    batch = pack_data(requests([2, 3], token_types=False), 0, 1, 8, 4, position_offset=2)
    assert "token_type_ids" not in batch.data
    np.testing.assert_array_equal(batch.data["position_ids"], [[2, 3, 2, 3, 4, 0, 0, 0]])
    batch = pack_data(requests([2, 3], position_ids=True), 0, 1, 8, 4, position_offset=2)
    np.testing.assert_array_equal(batch.data["position_ids"], [[100, 101, 100, 101, 102, 0, 0, 0]])


def _fake_unpack_repack_model(batch, segment_max_size):
    """What a compiled unpack/repack model does to the packed input_ids, using only unpack_info."""
    flat = batch.data["input_ids"].reshape(-1).astype(np.float32)
    starts = np.cumsum(batch.unpack_info) - batch.unpack_info
    out = np.zeros((len(batch.unpack_info), segment_max_size, 2), dtype=np.float32)
    for i, (start, n) in enumerate(zip(starts, batch.unpack_info, strict=True)):
        out[i, :n, 0] = flat[start : start + n]
        out[i, :n, 1] = -flat[start : start + n]
    return out


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=40),
    batch_size=st.integers(1, 4),
    extra_len=st.integers(0, 6),
    max_valid_num=st.integers(1, 10),
    across_rows=st.booleans(),
    algorithm=st.sampled_from(["first_fit", "next_fit"]),
)
def test_round_trip(lengths, batch_size, extra_len, max_valid_num, across_rows, algorithm):
    seq_len = max(lengths) + extra_len
    datasets = requests(lengths)
    index, seen = 0, []
    while index < len(datasets):
        batch = pack_data(
            datasets, index, batch_size, seq_len, max_valid_num, 1, across_rows, algorithm=algorithm
        )
        assert batch.count > index and len(batch.specs) <= max_valid_num
        seen += [s.index for s in batch.specs]
        if across_rows:
            outputs = unpack_outputs(batch, _fake_unpack_repack_model(batch, seq_len), True)
            outputs = [o[:, 0] for o in outputs]
        else:
            outputs = unpack_outputs(batch, batch.data["input_ids"].astype(np.float32), False)
        positions = unpack_outputs(batch, batch.data["position_ids"], False)
        for spec, out, pos in zip(batch.specs, outputs, positions, strict=True):
            np.testing.assert_array_equal(out, datasets[spec.index].input_ids)
            if not across_rows:  # positions in unpack mode may cross rows; checked via flat view
                np.testing.assert_array_equal(pos, np.arange(spec.length))
        if across_rows:
            flat = batch.data["position_ids"].reshape(-1)
            expected = np.concatenate([np.arange(s.length) for s in batch.specs])
            np.testing.assert_array_equal(flat[: len(expected)], expected)
        mask = batch.data["attention_mask"]
        assert (mask > 0).sum() == sum(s.length for s in batch.specs)
        assert ((mask > 0) == (batch.data["input_ids"] > 0)).all()
        index = batch.count
    assert seen == list(range(len(datasets)))


def test_unpack_outputs_rejects_wrong_shapes():
    batch = pack_data(requests(SMALL), 0, 2, 8, 6)
    with pytest.raises(RequestError) as info:
        unpack_outputs(batch, np.zeros((2, 8)), across_rows=True)
    assert str(info.value) == (
        "output has shape [2, 8]; an unpack/repack model returns "
        "[max_valid_num=6, segment_max_size>=5, ...]"
    )
    with pytest.raises(RequestError) as info:
        unpack_outputs(batch, np.zeros((6, 8)), across_rows=False)
    assert str(info.value) == (
        "output has shape [6, 8]; an AttentionMask-mode model returns "
        "[batch_size=2, seq_len=8, ...]"
    )


@pytest.mark.parametrize(
    "across_rows, kwargs, lengths, message",
    [
        (
            False,
            {},
            [3, 9],
            "datasets[1] has 9 tokens, outside 1..8 (seq_len); truncate or drop it",
        ),
        (True, {}, [9], "datasets[0] has 9 tokens, outside 1..8 (seq_len); truncate or drop it"),
        (
            True,
            {"segment_max_size": 4},
            [3, 5],
            "datasets[1] has 5 tokens, outside 1..4 (segment_max_size); truncate or drop it",
        ),
    ],
)
def test_rejects_long_requests(across_rows, kwargs, lengths, message):
    with pytest.raises(RequestError) as info:
        pack_data(requests(lengths), 0, 2, 8, 4, across_rows=across_rows, **kwargs)
    assert str(info.value) == message


def test_rejects_bad_arguments():
    datasets = requests([3, 3])
    with pytest.raises(PoprtError) as info:
        pack_data(datasets, 0, 2, 8, 4, segment_num=2)
    assert str(info.value) == "segment_num=2 is not supported; poprt-lite packs with segment_num=1"
    with pytest.raises(PoprtError) as info:
        pack_data(datasets, 2, 2, 8, 4)
    assert str(info.value) == "index 2 is outside datasets, which holds 2 requests"
    with pytest.raises(PoprtError) as info:
        pack_data(datasets, 0, 2, 8, 4, across_rows=False, algorithm="spfhp")
    assert str(info.value) == (
        "spfhp packs a whole dataset at once; online packing supports first_fit and next_fit"
    )
    datasets[1].token_type_ids = datasets[1].token_type_ids[:2]
    with pytest.raises(RequestError) as info:
        pack_data(datasets, 0, 2, 8, 4)
    assert str(info.value) == "datasets[1].token_type_ids has 2 tokens but input_len is 3"


def test_pad_data():
    batch = pad_data(requests([3, 1, 2]), 1, batch_size=3, seq_len=4)
    np.testing.assert_array_equal(batch.data["input_ids"], [[21, 0, 0, 0], [31, 32, 0, 0], [0] * 4])
    np.testing.assert_array_equal(
        batch.data["attention_mask"], [[1, 0, 0, 0], [1, 1, 0, 0], [0] * 4]
    )
    np.testing.assert_array_equal(batch.data["position_ids"], [[0, 0, 0, 0], [0, 1, 0, 0], [0] * 4])
    np.testing.assert_array_equal(batch.unpack_info, [1, 2, 0])
    assert batch.specs == [RequestSpec(1, 0, 0, 1), RequestSpec(2, 1, 0, 2)]
    assert batch.count == 3
    out = unpack_outputs(batch, batch.data["input_ids"], across_rows=False)
    assert [o.tolist() for o in out] == [[21], [31, 32]]


def _split_like_poprt_example(mask, output):
    """PopRT's packed_bert_example splits AttentionMask-mode outputs row by row, by segment id."""
    results = []
    for row, ids in zip(output, mask, strict=True):
        start = 0
        while start < len(ids) and ids[start] > 0:
            n = int((ids == ids[start]).sum())
            results.append(row[start : start + n])
            start += n
    return results


@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=30))
def test_next_fit_matches_poprt_examples_row_major_split(lengths):
    datasets = requests(lengths)
    index, results = 0, []
    while index < len(datasets):
        batch = pack_data(datasets, index, 3, 8, 6, across_rows=False, algorithm="next_fit")
        results += _split_like_poprt_example(batch.data["attention_mask"], batch.data["input_ids"])
        index = batch.count
    assert [r.tolist() for r in results] == [d.input_ids.tolist() for d in datasets]


@pytest.mark.parametrize("across_rows", [True, False], ids=["unpack_repack", "attention_mask"])
def test_offline_xlmr_sdpa_last_hidden_state_per_request(tmp_path, across_rows):
    """The offline path (pack_data, a plain Runner on the artifact, unpack_outputs) on XLM-R sdpa,
    whose exporter-named output dims once made the layout 'global' (issue 12.3)."""
    import onnxruntime as ort

    import poprt_lite
    from poprt_lite import runtime

    mode = "unpack_repack" if across_rows else "attention_mask"
    source = Path(__file__).resolve().parents[2] / "testdata" / "xlmr_sdpa.onnx"
    options = poprt_lite.CompileOptions(
        input_shape={"input_ids": (3, 16), "attention_mask": (3, 16)},
        pack_args={"max_valid_num": "6", "segment_max_size": "16", "mode": mode},
    )
    path = poprt_lite.compile(source, tmp_path / "m.onnx", output_dir=tmp_path, export_popef=True, options=options).artifact
    rng = np.random.default_rng(7)
    dataset = [
        Request(rng.integers(3, 1000, n), np.ones(n, np.int64), None, None, n) for n in (16, 5, 1, 9, 12, 3, 7)
    ]
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    runner = runtime.Runner(path)
    index, checked = 0, 0
    while index < len(dataset):
        batch = pack_data(dataset, index, 3, 16, 6, across_rows=across_rows, position_offset=2, segment_max_size=16)
        feeds = {k: v for k, v in batch.data.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if across_rows:
            feeds["unpack_info"] = batch.unpack_info
        (hidden,) = runner.run(["last_hidden_state"], feeds)
        for spec, got in zip(batch.specs, unpack_outputs(batch, hidden, across_rows), strict=True):
            request = dataset[spec.index]
            (want,) = original.run(None, {"input_ids": request.input_ids[None], "attention_mask": request.attention_mask[None]})
            np.testing.assert_allclose(got, want[0], atol=1e-4, rtol=0)
            checked += 1
        index = batch.count
    assert checked == len(dataset)
