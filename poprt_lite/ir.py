"""Loading, saving and converting models, with one-line errors for the ways that goes wrong."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from poprt_lite.errors import PoprtError

# Above this size a model must keep its weights in an external data file (protobuf's 2 GB limit).
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 13
METADATA_PREFIX = "poprt_lite."


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data), refusing anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise PoprtError(f"model file '{path}' does not exist; check --input_model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise PoprtError(
            f"'{path}' is not a valid ONNX model ({type(exc).__name__}); pass an .onnx file exported by torch.onnx or similar"
        ) from exc
    if not model.graph.node and not model.graph.input:
        raise PoprtError(f"'{path}' is not a valid ONNX model (no graph found); pass an .onnx file")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (FileNotFoundError, OSError) as exc:
        raise PoprtError(
            f"external data of '{path}' is missing ({exc.filename or exc}); keep the data file next to the model"
        ) from exc
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise PoprtError(
            f"'{path}' uses opset {opset}; poprt-lite needs opset >= {MIN_OPSET} (re-export with a newer opset_version)"
        )
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` atomically: a temporary file in the same folder, renamed into place.

    Models over protobuf's 2 GB limit keep their weights in `<name>.data` beside the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > PROTOBUF_LIMIT
    tmp = temporary_sibling(path)
    try:
        if large:
            onnx.save_model(
                model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data"
            )
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_sibling(path: Path) -> str:
    """A new empty file beside `path` (same file system, so `os.replace` is atomic), with the
    permissions a plain `open` would give."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return tmp


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the model-level fields of `template` that graphsurgeon drops."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name or "poprt-lite"
    model.producer_version = template.producer_version
    model.doc_string = template.doc_string
    model.model_version = template.model_version
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """poprt-lite's entries of the model metadata, without the prefix."""
    return {
        p.key[len(METADATA_PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)
    }


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    full = METADATA_PREFIX + key
    for prop in model.metadata_props:
        if prop.key == full:
            prop.value = value
            return
    model.metadata_props.add(key=full, value=value)


def infer_shapes_in_place(graph: gs.Graph) -> None:
    """Run onnx shape inference (with data propagation) on `graph` and copy the inferred shapes and
    dtypes onto its intermediate tensors, replacing what they held before."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs:
            tensor.shape = None
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    tensors = graph.tensors()
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = tensors.get(info.name)
        if not isinstance(tensor, gs.Variable) or not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if tensor_type.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make `node` read `new` wherever it read `old`."""
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` (graph outputs are not consumers and stay)."""
    for consumer in list(old.outputs):
        replace_input(consumer, old, new)
