"""Loading, saving and converting models, with one-line errors for the ways that goes wrong."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from google.protobuf.message import DecodeError

from poprt_lite.errors import PoprtError

# Above this size a model must keep its weights in an external data file (protobuf's 2 GB limit).
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 13
METADATA_PREFIX = "poprt_lite."


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data), refusing anything that is not one.

    Besides parsing, the graph is checked for what would otherwise fail later with a confusing
    message (see `check_graph`): a cycle, a tensor nobody produces, an unknown op, an old opset.
    """
    path = Path(path)
    if not path.is_file():
        raise PoprtError(f"model file '{path}' does not exist; check --input_model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise PoprtError(
            f"'{path}' is not a valid ONNX model ({type(exc).__name__}); pass an .onnx file exported by torch.onnx or similar"
        ) from exc
    except OSError as exc:
        raise PoprtError(f"cannot read model file '{path}' ({exc.strerror or exc})") from exc
    if not model.graph.node and not model.graph.input:
        raise PoprtError(f"'{path}' is not a valid ONNX model (no graph found); pass an .onnx file")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise PoprtError(
            f"'{path}' uses opset {opset}; poprt-lite needs opset >= {MIN_OPSET} (re-export with a newer opset_version)"
        )
    check_graph(model, f"'{path}'")
    load_external_data(model, path)
    return model


def load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the external data of `model` (saved at `path`) into it, with one-line errors.

    onnx refuses locations outside the model's folder (absolute or with `..`); a missing or short
    data file is reported by name.
    """
    external = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    if not external:
        return
    folder = path.parent
    for tensor in external:
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        if location.is_absolute() or ".." in location.parts:
            raise PoprtError(
                f"external data of '{path}' (tensor '{tensor.name}') points outside the model's folder ('{info.location}'); refusing to read it"
            )
        if not (folder / location).is_file():
            raise PoprtError(
                f"external data file '{folder / location}' of '{path}' is missing (tensor '{tensor.name}'); keep the data file next to the model"
            )
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        raise PoprtError(f"cannot read the external data of '{path}': {' '.join(str(exc).split())}") from exc
    for tensor in external:
        expected = _expected_bytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise PoprtError(
                f"external data of '{path}' is truncated: tensor '{tensor.name}' needs {expected} bytes, the file holds {len(tensor.raw_data)}"
            )


_FIXED_SIZE_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """The raw size of a tensor of a fixed-size element type, or None for other types."""
    if tensor.data_type not in _FIXED_SIZE_TYPES:
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def check_graph(model: onnx.ModelProto, what: str = "the model") -> None:
    """Refuse a top-level graph that no pass could handle, naming the problem in one line.

    Checks, in order: every op of the default domain exists at the model's opset (or is a
    model-local function); no tensor is produced twice; every node input is produced by a node, a
    graph input or an initializer; the graph has no cycle. A graph whose nodes are acyclic but out
    of order is put into topological order (exporters sometimes write them unsorted).
    """
    graph = model.graph
    opset = default_opset(model)
    functions = {(f.domain, f.name) for f in model.functions}
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and (node.domain, node.op_type) not in functions:
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                raise PoprtError(
                    f"{what} uses op '{node.op_type}' (node '{node.name}'), which is not an ONNX op at opset {opset}; poprt-lite converts standard ONNX models"
                ) from None
    available = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    available.update(t.values.name for t in graph.sparse_initializer)
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in available:
                first = f"node '{graph.node[producer[name]].name}'" if name in producer else "a graph input or initializer"
                raise PoprtError(
                    f"{what} is not a valid ONNX model: tensor '{name}' is produced twice (by {first} and node '{node.name}')"
                )
            producer[name] = index
    for node in graph.node:
        for name in node.input:
            if name not in available and name not in producer:
                raise PoprtError(
                    f"{what} is not a valid ONNX model: node '{node.name}' ({node.op_type}) reads tensor '{name}', which no node, graph input or initializer produces"
                )
    for output in graph.output:
        if output.name not in available and output.name not in producer:
            raise PoprtError(f"{what} is not a valid ONNX model: graph output '{output.name}' is produced by no node")
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(graph.node)))
    dag.add_edges_from((producer[name], index) for index, node in enumerate(graph.node) for name in node.input if name in producer)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = [u for u, _ in nx.find_cycle(dag)]
        names = " -> ".join(f"'{graph.node[i].name or graph.node[i].op_type}'" for i in [*cycle, cycle[0]])
        raise PoprtError(f"{what} is not a valid ONNX model: its graph has a cycle ({names}); an ONNX graph must be acyclic")
    # Keep the file's order wherever the dependencies allow it.
    order = list(nx.lexicographical_topological_sort(dag))
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` atomically: a temporary file in the same folder, renamed into place.

    Models over protobuf's 2 GB limit keep their weights in `<name>.data` beside the file; both
    files are written in a temporary folder beside `path` and renamed into place (the data file
    first), an existing data file is replaced rather than appended to, and `model` itself keeps its
    weights in memory.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if model.ByteSize() > PROTOBUF_LIMIT:
            _save_with_external_data(model, path)
            return path
        atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
    except OSError as exc:
        raise PoprtError(f"cannot write '{path}' ({exc.strerror or exc}); check the output path and free space") from exc
    return path


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    data_name = f"{path.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tensors = list(external_data_helper._get_all_tensors(model))
    explicit_location = [t.HasField("data_location") for t in tensors]

    def restore_weights() -> None:
        # onnx moves the weights out of `model` while saving; read them back so the caller's model
        # is unchanged (down to its serialized bytes)
        external_data_helper.load_external_data_for_model(model, str(staging))
        for tensor, explicit in zip(tensors, explicit_location):
            if not explicit:
                tensor.ClearField("data_location")

    try:
        onnx.save_model(model, staging / path.name, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        restore_weights()
        os.chmod(staging / data_name, _default_file_mode())  # onnx creates it private (0600)
        os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)
    except BaseException:
        if (staging / data_name).is_file():
            with contextlib.suppress(Exception):
                restore_weights()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place; on any
    failure the temporary file is removed, so nothing half-written is left."""
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_sibling(path: Path) -> str:
    """A new empty file beside `path` (same file system, so `os.replace` is atomic), with the
    permissions a plain `open` would give."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _default_file_mode())
    os.close(fd)
    return tmp


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
    # Graph outputs keep their declared shapes where inference has nothing better (ops without an
    # inference function); intermediate shapes are recomputed from scratch.
    interface = {t.name for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in interface:
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
