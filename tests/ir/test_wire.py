"""The protobuf wire-level reading and writing of ONNX files."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError

from conftest import model_path
from poprt_lite.ir import wire


def test_strip_raw_data_leaves_a_model_without_the_large_tensors_bytes():
    data = model_path("bert_qa_torchscript").read_bytes()
    skeleton, found = wire.strip_raw_data(data, min_length=1024)
    original = onnx.ModelProto.FromString(data)
    stripped = onnx.ModelProto.FromString(skeleton)
    assert len(skeleton) < len(data) // 10
    assert found and all(f.length >= 1024 for f in found)
    large = {i for i, t in enumerate(original.graph.initializer) if len(t.raw_data) >= 1024}
    assert {f.index for f in found} == large
    for f in found:
        tensor = stripped.graph.initializer[f.index]
        assert not tensor.HasField("raw_data")
        assert data[f.offset : f.offset + f.length] == original.graph.initializer[f.index].raw_data
        tensor.raw_data = data[f.offset : f.offset + f.length]
    assert stripped == original


def test_strip_raw_data_handles_records_in_any_order_and_split_graphs():
    """A graph given in two records (a parser merges them) and a tensor whose raw_data comes
    before its name: every large initializer is still found, at its index in the merged list."""
    a, b, c = np.arange(300, dtype=np.float32), np.full(400, 2, np.float32), np.ones(2, np.float32)
    first = onnx.GraphProto(name="g", initializer=[onnx.numpy_helper.from_array(a, "a")])
    header_b = onnx.TensorProto(name="b", data_type=onnx.TensorProto.FLOAT, dims=b.shape).SerializeToString()
    tensor_b = wire.key(wire.RAW_DATA, b.nbytes) + b.tobytes() + header_b
    tensor_c = onnx.numpy_helper.from_array(c, "c").SerializeToString()
    second = wire.key(wire.INITIALIZER, len(tensor_b)) + tensor_b + wire.key(wire.INITIALIZER, len(tensor_c)) + tensor_c
    data = (
        onnx.ModelProto(ir_version=8).SerializeToString()
        + wire.key(wire.GRAPH, first.ByteSize()) + first.SerializeToString()
        + wire.key(wire.GRAPH, len(second)) + second
    )
    skeleton, found = wire.strip_raw_data(data, min_length=1024)
    model = onnx.ModelProto.FromString(skeleton)
    assert (model.graph.name, [t.name for t in model.graph.initializer]) == ("g", ["a", "b", "c"])
    assert [(f.index, data[f.offset : f.offset + f.length]) for f in found] == [(0, a.tobytes()), (1, b.tobytes())]
    assert onnx.numpy_helper.to_array(model.graph.initializer[2]).tolist() == [1, 1]


@pytest.mark.parametrize(
    "data",
    [b"\x3a\x05abc", b"\x0b", b"\x00\x01", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"],
    ids=["truncated", "group", "field-0", "overlong-varint"],
)
def test_broken_wire_format_is_a_decode_error(data):
    with pytest.raises(DecodeError):
        wire.strip_raw_data(data)


def test_write_model_appends_the_tensors_and_reports_the_size():
    model = onnx.load(model_path("bert_qa_torchscript"))
    tensors = [model.graph.initializer.pop() for _ in range(3)][::-1]
    apart = [
        wire.Apart(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims).SerializeToString(), np.frombuffer(t.raw_data, np.uint8))
        for t in tensors[:2]
    ] + [wire.Apart(tensors[2].SerializeToString())]
    stream = io.BytesIO()
    size = wire.write_model(model, apart, stream)
    assert size == len(stream.getvalue()) == wire.model_size(model, apart)
    model.graph.initializer.extend(tensors)
    assert onnx.ModelProto.FromString(stream.getvalue()) == model
