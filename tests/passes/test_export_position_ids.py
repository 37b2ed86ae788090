import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import ALL_MODELS, PAD_ID, make_request, model_path, run
from poprt_lite import compile, ir
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import PoprtError
from poprt_lite.passes import PassContext, PassManager, get_pass

EXPECTED_OFFSET = {"roberta_qa": 2}


def padded_batch(rng, lengths, seq_len, pad_id, offset):
    requests = [make_request(rng, n) for n in lengths]
    feeds = {k: np.zeros((len(lengths), seq_len), np.int64) for k in requests[0]}
    feeds["input_ids"][:] = pad_id
    feeds["position_ids"] = np.zeros((len(lengths), seq_len), np.int64)
    for row, (request, n) in enumerate(zip(requests, lengths, strict=True)):
        for key, value in request.items():
            feeds[key][row, :n] = value[0]
        feeds["position_ids"][row, :n] = np.arange(n) + offset
    return requests, feeds


@pytest.mark.parametrize("name", ALL_MODELS)
def test_exported_position_ids_with_static_shape_match_original_per_request(name, rng):
    source = ir.load_model(model_path(name))
    shape = {"input_ids": (3, 12), "attention_mask": (3, 12)}
    if any(i.name == "token_type_ids" for i in source.graph.input):
        shape["token_type_ids"] = (3, 12)
    result = compile(
        model_path(name), save=False, options=CompileOptions(export_position_ids=True, input_shape=shape)
    )
    model = result.model
    meta = ir.get_metadata(model)
    assert meta["position_offset"] == str(EXPECTED_OFFSET.get(name, 0))
    assert meta["vocab_size"] == "1000"
    position_ids = next(i for i in model.graph.input if i.name == "position_ids")
    assert [d.dim_value for d in position_ids.type.tensor_type.shape.dim] == [3, 12]
    assert position_ids.type.tensor_type.elem_type == onnx.TensorProto.INT64
    # static_shape folded every Shape away and left every value static
    assert not [n for n in model.graph.node if n.op_type == "Shape"]
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name

    lengths = [12, 5, 1]
    requests, feeds = padded_batch(rng, lengths, 12, PAD_ID.get(name, 0), int(meta["position_offset"]))
    packed_outputs = run(model, feeds)
    for row, (request, n) in enumerate(zip(requests, lengths, strict=True)):
        for want, got in zip(run(source, request), packed_outputs, strict=True):
            got_row = got[row, :n] if want.ndim >= 2 and want.shape[1] == n else got[row]
            np.testing.assert_allclose(got_row, want[0], atol=1e-4, rtol=0)


def test_position_ids_already_an_input_is_left_alone():
    model = compile(model_path("bert_qa_torchscript"), save=False, options=CompileOptions(export_position_ids=True)).model
    again, records = PassManager([get_pass("export_position_ids")()]).run(model)
    assert records[0].changed is False
    assert records[0].message == "'position_ids' is already an input"
    assert [i.name for i in again.graph.input] == [i.name for i in model.graph.input]


def test_missing_pattern_changes_nothing_and_says_so():
    model = compile(model_path("bert_qa_torchscript"), save=False, options=CompileOptions(export_position_ids=True)).model
    # Rename the input away so the pass finds no computed position ids.
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for value in renamed.graph.input:
        if value.name == "position_ids":
            value.name = "positions"
    for node in renamed.graph.node:
        node.input[:] = ["positions" if i == "position_ids" else i for i in node.input]
    out, records = PassManager([get_pass("export_position_ids")()]).run(renamed)
    assert records[0].changed is False
    assert records[0].message == "no position-id computation found; model unchanged"
    assert len(out.graph.node) == len(renamed.graph.node)


def test_record_of_offset_for_runtime(tmp_path):
    out = tmp_path / "r.onnx"
    compile(model_path("roberta_qa"), out, options=CompileOptions(export_position_ids=True))
    assert ir.get_metadata(onnx.load(out))["position_offset"] == "2"


def test_context_metadata_reaches_model():
    ctx = PassContext()
    model, _ = PassManager([get_pass("export_position_ids")()]).run(ir.load_model(model_path("distilbert_qa")), ctx)
    assert ctx.metadata["role.position_ids"] == "position_ids"
    assert ir.get_metadata(model)["role.position_ids"] == "position_ids"


def _exported(name: str):
    model, records = PassManager([get_pass("export_position_ids")()]).run(ir.load_model(model_path(name)))
    return ir.to_graph(model), records[0]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_roformer_table_lookup_reads_position_ids_and_keeps_the_batch(exporter):
    """RoFormer's sin / cos rows, a Gather from its sinusoidal table by Range(0, seq) made
    [1, 1, seq, 16], become position_ids' rows [batch, 1, seq, 16]; the token types of zeros the
    export computes are left alone."""
    graph, record = _exported(f"roformer_{exporter}")
    assert record.changed
    lookup = next(n for n in graph.nodes if n.op == "Gather" and n.inputs[0].name == "model.encoder.embed_positions.weight")
    assert lookup.inputs[1].name == "position_ids"
    (broadcast,) = lookup.outputs[0].outputs
    assert broadcast.op == "Unsqueeze" and broadcast.inputs[1].values.tolist() == [1]
    types = next(n for n in graph.nodes if n.op == "Gather" and n.inputs[0].name == "model.embeddings.token_type_embeddings.weight")
    assert types.inputs[1].name != "position_ids"
    reshapes = [n for n in graph.nodes if n.op == "Reshape" and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values.tolist() == [0, 1, -1, 16]]
    assert len(reshapes) == (2 if exporter == "dynamo" else 0)  # dynamo's [1, 1, -1, 16] views of the rows
    assert all(n.attrs["allowzero"] == 0 for n in reshapes)


def _range_from_one(name: str, range_node: str) -> onnx.ModelProto:
    """`name` with Range node `range_node` counting from 1: positions 1, 2, ... the pattern must not take."""
    model = ir.load_model(model_path(name))
    graph = ir.to_graph(model)
    node = next(n for n in graph.nodes if n.name == range_node)
    start = node.inputs[0]
    node.inputs[0] = gs.Constant(f"{range_node}_from_one", np.ones((), dtype=start.dtype or np.int64))
    return ir.to_model(graph.cleanup(), model)


UNRECOGNIZED = {  # model, its Range node -> what the refusal says of it counting from 1
    ("modernbert_rotary_torchscript", "/model/Range"): "the rotary angles of Cos node '/model/rotary_emb/Cos' are computed from Range node '/model/Range', which does not count 0, 1, 2, ...",
    ("modernbert_rotary_dynamo", "node_arange"): "the rotary angles of Cos node 'node_cos' are computed from Range node 'node_arange', which does not count 0, 1, 2, ...",
    ("roformer_torchscript", "/model/encoder/embed_positions/Range"): "the rotary table lookup Gather node '/model/encoder/embed_positions/Gather' reads Range node '/model/encoder/embed_positions/Range', which does not count 0, 1, 2, ...",
    ("roformer_dynamo", "node_arange_2"): "the rotary table lookup Gather node 'node_embedding_2' reads Range node 'node_arange_2', which does not count 0, 1, 2, ...",
}


@pytest.mark.parametrize("case", UNRECOGNIZED, ids=lambda c: c[0])
def test_unrecognized_rotary_positions_are_refused_naming_the_node(case, tmp_path):
    """Rotary positions of a form export_position_ids does not replace: the pass says what it found
    and leaves the model; packing refuses in one line naming the node and saying what to do."""
    source = tmp_path / "model.onnx"
    onnx.save(_range_from_one(*case), source)
    _, records = PassManager([get_pass("export_position_ids")()]).run(onnx.load(source))
    assert records[0].changed is False
    assert records[0].message == f"rotary positions not recognized: {UNRECOGNIZED[case]}; model unchanged"
    options = CompileOptions(pack_args={"max_valid_num": "4", "segment_max_size": "16", "mode": "token_stream", "max_tokens": "64"})
    with pytest.raises(PoprtError) as info:
        compile(source, tmp_path / "out" / "model.onnx", options=options)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(
        f"token_stream_packing needs rotary positions that restart at each request, and {UNRECOGNIZED[case]}: not a form export_position_ids can replace "
        "with a 'position_ids' input; export the model with a 'position_ids' input that the angles are computed from"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.onnx"))
