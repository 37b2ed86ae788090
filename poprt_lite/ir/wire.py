"""ONNX files at the protobuf wire level: read one without copying its weights, write one a tensor at a time.

protobuf parses a whole message into memory and serializes a whole message into one bytes object,
so a 1 GB model costs 1 GB to parse (on top of the file's bytes) and 1 GB more to write. Here the
weights stay where they are: `strip_raw_data` walks the file (memory-mapped) down to each
initializer's `raw_data` field and returns the file without those fields, small enough to parse,
and where each one lies, so its bytes can be viewed in the mapping; `write_model` writes a model
whose large initializers are given apart (headers and byte buffers), streaming each buffer into
the file. Both rely only on the wire format's guarantees: a message is a sequence of
(field number, wire type, value) records in any order, and a repeated or message field may be
split over several records, which a parser concatenates or merges.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Union

import onnx
from google.protobuf.message import DecodeError

GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

Buffer = Union[bytes, bytearray, memoryview]  # or anything else with the buffer protocol (mmap, numpy)


@dataclass(frozen=True)
class RawData:
    """Where the `raw_data` of the initializer at `index` (in file order) lies in the file."""

    index: int
    offset: int
    length: int


def strip_raw_data(data: Buffer, min_length: int = 0) -> tuple[bytes, list[RawData]]:
    """The serialized ModelProto `data` without the `raw_data` fields of its graph's initializers
    that hold at least `min_length` bytes, and where those fields' bytes are in `data`.

    Raises DecodeError where the wire format is broken (truncated, bad wire type or field number).
    """
    view = memoryview(data).cast("B")
    out = bytearray()
    found: list[RawData] = []
    index = 0
    for number, wire_type, start, value_start, end in _records(view, 0, len(view)):
        if number != GRAPH or wire_type != LENGTH_DELIMITED:
            out += view[start:end]
            continue
        graph = bytearray()
        for g_number, g_type, g_start, g_value, g_end in _records(view, value_start, end):
            if g_number != INITIALIZER or g_type != LENGTH_DELIMITED:
                graph += view[g_start:g_end]
                continue
            tensor = bytearray()
            raw = None
            for t_number, t_type, t_start, t_value, t_end in _records(view, g_value, g_end):
                if t_number == RAW_DATA and t_type == LENGTH_DELIMITED and t_end - t_value >= min_length:
                    raw = RawData(index, t_value, t_end - t_value)  # the last record wins, as in protobuf
                else:
                    tensor += view[t_start:t_end]
            if raw is not None:
                found.append(raw)
            index += 1
            graph += key(INITIALIZER, len(tensor))
            graph += tensor
        out += key(GRAPH, len(graph))
        out += graph
    return bytes(out), found


@dataclass
class Apart:
    """A tensor written apart from the serialized graph: its TensorProto without the data
    (`header`), and `data`, the raw bytes, or None when `header` is the whole serialized tensor."""

    header: bytes
    data: Buffer | None = None

    @property
    def size(self) -> int:
        if self.data is None:
            return len(self.header)
        length = memoryview(self.data).nbytes
        return len(self.header) + len(key(RAW_DATA, length)) + length


def model_size(model: onnx.ModelProto, apart: Sequence[Apart]) -> int:
    """The size of the file `write_model(model, apart, ...)` writes, without writing it."""
    graph = model.graph.ByteSize() + sum(len(key(INITIALIZER, t.size)) + t.size for t in apart)
    return model.ByteSize() - _graph_record_size(model) + len(key(GRAPH, graph)) + graph


def write_model(model: onnx.ModelProto, apart: Sequence[Apart], stream: BinaryIO) -> int:
    """Write `model` with the tensors `apart` appended to its graph's initializers; returns the size.

    Each tensor's bytes go from its buffer to `stream` without being copied into one message.
    """
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    graph = model.graph.SerializeToString()
    graph_size = len(graph) + sum(len(key(INITIALIZER, t.size)) + t.size for t in apart)
    written = _write(stream, head.SerializeToString())
    written += _write(stream, key(GRAPH, graph_size))
    written += _write(stream, graph)
    for tensor in apart:
        written += _write(stream, key(INITIALIZER, tensor.size))
        written += _write(stream, tensor.header)
        if tensor.data is not None:
            written += _write(stream, key(RAW_DATA, memoryview(tensor.data).nbytes))
            written += _write(stream, tensor.data)
    return written


def key(number: int, length: int) -> bytes:
    """The key of a length-delimited field `number` and the varint of its `length`."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(length)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _write(stream: BinaryIO, data: Buffer) -> int:
    view = memoryview(data).cast("B")
    stream.write(view)
    return len(view)


def _graph_record_size(model: onnx.ModelProto) -> int:
    if not model.HasField("graph"):
        return 0
    size = model.graph.ByteSize()
    return len(key(GRAPH, size)) + size


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _records(view: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, record start, value start, record end) of each record in [pos, end)."""
    while pos < end:
        start = pos
        field_key, pos = _read_varint(view, pos, end)
        number, wire_type = field_key >> 3, field_key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == VARINT:
            value, (_, after) = pos, _read_varint(view, pos, end)
        elif wire_type == FIXED64:
            value, after = pos, pos + 8
        elif wire_type == FIXED32:
            value, after = pos, pos + 4
        elif wire_type == LENGTH_DELIMITED:
            length, value = _read_varint(view, pos, end)
            after = value + length
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if after > end:
            raise DecodeError("truncated message")
        yield number, wire_type, start, value, after
        pos = after
