"""Differential test: every testdata model x every pack mode x every API, against the original model.

Each bundled model is compiled in every pack mode (`MODES`: a new mode is one entry) and random
requests go through every way of running a packed artifact:

- `online`: the PackRunner, one `execute_async` per request with no output arrays (it allocates);
- `run_requests`: the plain runner's offline path (best-fit-decreasing over all requests);
- `pack_data_artifact`: PopRT's `packing_utils.pack_data` loop with `artifact=`, fed to `runner.run`;
- `pack_data_by_hand`: the same loop with every argument given by hand, as a ported PopRT script does.

Every answer is compared with the original model run on that request alone, unpadded (1e-4). A
(model, mode) pair that cannot be packed must be refused at compile time with one line
(`REFUSED`, with the reason; when a pass learns to pack it, the entry goes and the pair is tested).

Misuse must raise a one-line error instead of giving plausible numbers: feeds packed with the wrong
position offset, for another mode, or with a wrong unpack_info (or wrong segment ids).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

import poprt_lite
from conftest import TESTDATA, VOCAB
from poprt_lite import runtime
from poprt_lite.runtime import packing_utils
from poprt_lite.errors import PoprtError, RequestError
from poprt_lite.runtime.interface import PackedInterface
from poprt_lite.runtime.modes import layout_for
from poprt_lite.vocab import PackMode, Role

MODELS = sorted(path.stem for path in TESTDATA.glob("*.onnx"))
B, S, N, L = 2, 32, 6, 32  # batch rows, row length, max_valid_num, segment_max_size
PACK = {"max_valid_num": str(N), "segment_max_size": str(L)}
MODES = {  # pack mode -> its CompileOptions: a new mode is one more entry
    PackMode.unpack_repack: dict(input_shape={"input_ids": (B, S)}, pack_args={**PACK, "mode": PackMode.unpack_repack.value}),
    PackMode.attention_mask: dict(input_shape={"input_ids": (B, S)}, pack_args={**PACK, "mode": PackMode.attention_mask.value}),
    PackMode.token_stream: dict(pack_args={**PACK, "max_tokens": str(B * S), "mode": PackMode.token_stream.value}),
}
REFUSED: dict[tuple[str, PackMode], str] = {  # (model, mode) -> why it is refused at compile time (part of the message)
    (f"mask_table_{exporter}", PackMode.attention_mask): "it combines the padding mask with a constant table of per-position values ('table', [128, 128])"
    for exporter in ("torchscript", "dynamo")
}
APIS = ("online", "run_requests", "pack_data_artifact", "pack_data_by_hand")
CASES = [(model, mode) for model in MODELS for mode in MODES]
SERVED = [case for case in CASES if case not in REFUSED]
ATOL = 1e-4


@functools.cache
def compiled(model: str, mode: PackMode, tmp: str) -> str:
    out = f"{tmp}/{model}_{mode}"
    options = poprt_lite.CompileOptions(**MODES[mode])
    return str(poprt_lite.compile(TESTDATA / f"{model}.onnx", f"{out}/model.onnx", output_dir=out, export_popef=True, options=options).artifact)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("differential"))


@pytest.fixture
def artifact(workdir, request) -> str:
    model, mode = request.node.callspec.params["case"]
    return compiled(model, mode, workdir)


@functools.cache
def plain_runner(path: str) -> runtime.ModelRunner:
    return runtime.Runner(path, threads=1)


@functools.cache
def source(model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(TESTDATA / f"{model}.onnx"), providers=["CPUExecutionProvider"])


def requests_for(interface: PackedInterface, seed: int = 0, count: int = 11, lengths=None) -> list[dict[str, np.ndarray]]:
    """Unpadded requests of random lengths (1..the longest the artifact takes, the first the longest),
    or of `lengths`; token ids avoid the special ids 0-2, token types are random where the model
    takes them."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(1, interface.max_length + 1, count)
        lengths[0] = interface.max_length
    requests = []
    for n in lengths:
        request = {interface.dynamic_input: rng.integers(3, VOCAB, n)}
        for name, token_input in interface.token_inputs.items():
            if token_input.role is Role.token_type_ids:
                request[name] = rng.integers(0, 2, n)
        requests.append(request)
    return requests


def expected(model: str, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original model's outputs for one request run alone: `[n, ...]` per token, `[...]` pooled."""
    key = (model, tuple((name, value.tobytes()) for name, value in request.items()))
    if key not in _EXPECTED:
        _EXPECTED[key] = _run_alone(model, request)
    return _EXPECTED[key]


_EXPECTED: dict = {}


def _run_alone(model: str, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = source(model)
    n = len(next(iter(request.values())))
    defaults = {"position_ids": np.arange(n)}  # models exported with a position_ids input
    feeds = {i.name: np.asarray(request.get(i.name, defaults.get(i.name, np.ones(n, np.int64))))[None].astype(np.int64) for i in session.get_inputs()}
    return {o.name: value[0] for o, value in zip(session.get_outputs(), session.run(None, feeds), strict=True)}


def assert_answers(model: str, requests: list[dict], answers: list[dict]) -> None:
    assert len(answers) == len(requests)
    for i, (request, got) in enumerate(zip(requests, answers, strict=True)):
        want = expected(model, request)
        assert set(got) == set(want), f"request {i}: outputs {sorted(got)} != {sorted(want)}"
        for name, value in want.items():
            assert got[name].shape == value.shape, f"request {i} output {name}: shape {got[name].shape} != {value.shape}"
            diff = float(np.abs(got[name].astype(np.float64) - value).max())
            assert diff <= ATOL, f"request {i} ({len(request[next(iter(request))])} tokens) output {name}: max abs diff {diff:.3g}"


def datasets_of(requests: list[dict], interface: PackedInterface) -> list[SimpleNamespace]:
    """The requests as PopRT's packing_utils takes them: objects with input_ids, input_len, ..."""
    return [SimpleNamespace(**{name: value for name, value in r.items()}, input_len=len(r[interface.dynamic_input])) for r in requests]


def pack_data_loop(runner, requests: list[dict], **arguments) -> list[dict]:
    """PopRT's offline loop: pack_data batch after batch, run each, split each output per request."""
    interface = runner.interface
    datasets, answers, index = datasets_of(requests, interface), [None] * len(requests), 0
    while index < len(datasets):
        batch = packing_utils.pack_data(datasets, index, interface.batch_size, interface.seq_len, interface.max_valid_num, 1, **arguments)
        feeds = {name: batch.data[name] for name in runner.inputs if name in batch.data}
        if interface.unpack_info is not None:
            feeds[interface.unpack_info[0]] = batch.unpack_info
        results = dict(zip(runner.output_names, runner.run(None, feeds), strict=True))
        shares = {name: packing_utils.unpack_outputs(batch, out, layout=interface.outputs[name].layout) for name, out in results.items()}
        for k, spec in enumerate(batch.specs):
            answers[spec.index] = {name: parts[k] for name, parts in shares.items()}
        index = batch.count
    return answers


def by_hand(interface: PackedInterface, **changes) -> dict:
    """Every pack_data argument given by hand, as PopRT's example does (the artifact's values)."""
    arguments = dict(
        across_rows=interface.layout.across_rows,
        position_offset=interface.position_offset,
        segment_max_size=interface.segment_max_size,
        mode=interface.mode,
    )
    return {**arguments, **changes}


# ----------------------------------------------------------------------------------- the answers


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_each_pair_is_served_or_refused_as_listed(case, workdir, tmp_path):
    """A pair in REFUSED is refused at compile time with one line and nothing half-written; every
    other pair compiles to an artifact of its mode."""
    model, mode = case
    if case not in REFUSED:
        assert plain_runner(compiled(model, mode, workdir)).interface.mode is mode
        return
    with pytest.raises(PoprtError) as info:
        compiled(model, mode, str(tmp_path))
    message = str(info.value)
    assert REFUSED[case] in message and "\n" not in message
    assert not any(tmp_path.rglob("*.onnx")) and not any(tmp_path.rglob("*.popef"))  # nothing half-written


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", SERVED, ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_api_gives_the_original_models_answers(case, api, artifact):
    model, _ = case
    if api == "online":
        config = runtime.PackRunnerConfig(timeout_microseconds=20_000)
        with runtime.Runner(artifact, config) as runner:
            requests = requests_for(runner.interface)
            with runner._cond:  # all queued before the serving thread takes a batch: they share batches
                futures = [runner.execute_async(r) for r in requests]  # no outputs given: allocated
            answers = [future.result(timeout=60) for future in futures]
            assert runner.stats.batches < len(requests)  # requests shared batches
    else:
        runner = plain_runner(artifact)
        requests = requests_for(runner.interface)
        if api == "run_requests":
            answers = runner.run_requests(requests)
        elif api == "pack_data_artifact":
            answers = pack_data_loop(runner, requests, artifact=artifact)
        else:
            answers = pack_data_loop(runner, requests, **by_hand(runner.interface))
    assert_answers(model, requests, answers)


# -------------------------------------------------------------------------------------- misuse


WRONG_MODE = {  # what the plain runner says of feeds packed for another mode, by the artifact's mode
    PackMode.unpack_repack: "holds segment ids up to 2, but this artifact was compiled for unpack_repack mode",
    PackMode.attention_mask: "several requests share one segment id; this artifact (attention_mask mode) takes each request",
}


def packed_feeds(runner, **arguments) -> tuple[dict, packing_utils.PackedBatch]:
    """One batch of requests packed by hand with `arguments`, as the model's feeds. The lengths lay
    out differently in every mode: rows [29 + 3 padding] and [29, 2] in AttentionMask mode, one
    stream 29, 29, 2, 2 across the rows otherwise (two requests cross or share a row)."""
    interface = runner.interface
    longest = interface.max_length
    datasets = datasets_of(requests_for(interface, seed=1, lengths=[longest - 3, longest - 3, 2, 2]), interface)
    batch = packing_utils.pack_data(datasets, 0, interface.batch_size, interface.seq_len, interface.max_valid_num, 1, **arguments)
    feeds = {name: batch.data[name] for name in runner.inputs if name in batch.data}
    if interface.unpack_info is not None:
        feeds[interface.unpack_info[0]] = batch.unpack_info
    return feeds, batch


def has_positions(interface: PackedInterface) -> bool:
    """Where the requests start shows in packed feeds through their position ids only: an artifact
    of a model with relative positions only (DeBERTa) has none, so a wrong unpack_info, merged segment
    ids or rows packed across are not detectable in its feeds (README: the plain runner's checks)."""
    return any(t.role is Role.position_ids for t in interface.token_inputs.values())


def assert_refused(runner, feeds: dict, *fragments: str) -> str:
    with pytest.raises(RequestError) as info:
        runner.run(None, feeds)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


@pytest.mark.parametrize("case", SERVED, ids=lambda c: f"{c[0]}-{c[1]}")
def test_wrong_position_offset_is_refused(case, artifact):
    runner = plain_runner(artifact)
    interface = runner.interface
    if not has_positions(interface):
        pytest.skip("the artifact takes no position ids (relative positions only)")
    wrong = interface.position_offset + 1
    feeds, _ = packed_feeds(runner, **by_hand(interface, position_offset=wrong))
    assert_refused(
        runner, feeds, f"starts request 0 (at row 0, column 0) at {wrong}; the artifact's position ids start at "
        f"{interface.position_offset} for each request: pack with position_offset={interface.position_offset}"
    )
    with pytest.raises(PoprtError, match=f"^position_offset={wrong} contradicts artifact"):
        packed_feeds(runner, artifact=runner, position_offset=wrong)
    good, _ = packed_feeds(runner, **by_hand(interface))
    runner.run(None, good)  # the same batch with the artifact's offset runs


@pytest.mark.parametrize("case", SERVED, ids=lambda c: f"{c[0]}-{c[1]}")
def test_feeds_packed_for_another_mode_are_refused(case, artifact):
    runner = plain_runner(artifact)
    interface = runner.interface
    for mode in MODES:
        if mode is interface.mode or (mode is PackMode.token_stream) != (interface.mode is PackMode.token_stream):
            continue  # token_stream feeds are [1, T]: another shape, refused by the shape check
        other = layout_for(mode, interface.batch_size, interface.seq_len)
        feeds, _ = packed_feeds(runner, **by_hand(interface, across_rows=other.across_rows, mode=mode))
        if has_positions(interface) or interface.mode is PackMode.unpack_repack:  # segment ids show in the mask
            assert_refused(runner, feeds, WRONG_MODE[interface.mode])
    with pytest.raises(PoprtError, match="contradicts artifact"):
        packed_feeds(runner, artifact=runner, across_rows=not interface.layout.across_rows)


@pytest.mark.parametrize("case", SERVED, ids=lambda c: f"{c[0]}-{c[1]}")
def test_wrong_unpack_info_or_segment_ids_are_refused(case, artifact):
    runner = plain_runner(artifact)
    interface = runner.interface
    feeds, batch = packed_feeds(runner, **by_hand(interface))
    runner.run(None, feeds)
    lengths = [s.length for s in batch.specs]
    if interface.unpack_info is None:  # attention_mask: segment ids delimit the requests
        assert_refused(runner, {**feeds, "unpack_info": batch.unpack_info}, "unexpected feed 'unpack_info'")
        mask_name = interface.mask[0]
        mask = feeds[mask_name].copy()
        row = int(np.argmax((mask.max(axis=1) > 1)))
        last = mask[row].max()
        mask[row][mask[row] == last] = last - 1  # the last two requests of a row under one segment id
        if has_positions(interface):
            assert_refused(runner, {**feeds, mask_name: mask}, "position_ids", "several requests share one segment id")
        mask = feeds[mask_name].copy()
        mask[mask == 1] = 7
        assert_refused(runner, {**feeds, mask_name: mask}, "numbers the requests of a row 1, 2, 3")
        return
    name = interface.unpack_info[0]
    info = np.asarray(feeds[name]).copy()
    k = int(np.argmax(np.diff(lengths) != 0))  # two neighbours of different lengths
    swapped = info.copy()
    swapped[[k, k + 1]] = swapped[[k + 1, k]]
    if has_positions(interface):
        assert_refused(runner, {**feeds, name: swapped}, "position_ids")
    longer = info.copy()
    longer[len(lengths) - 1] += 1
    assert_refused(runner, {**feeds, name: longer})
    gap = np.concatenate([info[:1], [0], info[1:]])[: len(info)] if interface.mode is not PackMode.token_stream else None
    if gap is not None and len(lengths) < len(info):
        assert_refused(runner, {**feeds, name: gap}, "after an unused slot")
