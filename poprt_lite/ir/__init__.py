"""Loading, saving and converting models, with one-line errors for the ways that goes wrong.

`open_model` gives the model a conversion works on (`Model`: one graph for the whole pipeline,
weights memory-mapped, checks on the structure, written once); `load_model` / `save_model` read
and write a whole `onnx.ModelProto`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx, update_import_domains
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter, get_onnx_tensor_dtype, get_onnx_tensor_shape, get_onnx_tensor_type
from onnx_graphsurgeon.ir.tensor import SparseValues
from google.protobuf.message import DecodeError

from poprt_lite import ops
from poprt_lite.ir import wire
from poprt_lite.errors import PoprtError, option

# Above this size a model must keep its weights in an external data file (protobuf's 2 GB limit).
PROTOBUF_LIMIT = 2**31 - 1
MIN_OPSET = 13
METADATA_PREFIX = "poprt_lite."
ORT_DOMAIN = "com.microsoft"  # onnxruntime's own ops (its transformer optimizer's fusions)
# onnxruntime's own ops of the ONNX domain: its optimizer writes them at any opset, also where ONNX has no such op.
ONNXRUNTIME_ONNX_OPS = ("LayerNormalization", "SimplifiedLayerNormalization")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) as one ModelProto, refusing anything that is not one.

    Besides parsing, the graph is checked for what would otherwise fail later with a confusing
    message (see `check_graph`): a cycle, a tensor nobody produces, an unknown op, an old opset.
    onnxruntime's ops of the ONNX domain are accepted: the model goes to onnxruntime, not to passes.
    """
    path = Path(path)
    _check_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise _not_onnx(path, exc) from exc
    except OSError as exc:
        raise PoprtError(f"cannot read model file '{path}' ({exc.strerror or exc})") from exc
    _check_model_proto(model, path, onnxruntime_ops=True)
    load_external_data(model, path)
    return model


def open_model(path: str | os.PathLike, onnxruntime_ops: bool = False) -> Model:
    """Open an ONNX model for conversion, with the checks of `load_model`, without reading its weights.

    The file and its external data files are memory-mapped; each weight of at least `APART_BYTES`
    becomes a numpy view into a mapping (copy-on-write, so nothing ever writes to the files), and
    only the rest of the file (nodes, small tensors) is parsed. `onnxruntime_ops`: accept
    onnxruntime's ops of the ONNX domain (see `check_graph`).
    """
    path = Path(path)
    _check_file(path)
    mapping = _map_file(path, what=f"model file '{path}'")
    try:
        skeleton, raw = wire.strip_raw_data(mapping, min_length=APART_BYTES)
        model = onnx.ModelProto.FromString(skeleton)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise _not_onnx(path, exc) from exc
    _check_model_proto(model, path, onnxruntime_ops)
    arrays = {}
    initializers = model.graph.initializer
    for found in raw:
        tensor = initializers[found.index]
        if _numpy_dtype(tensor) is None:  # bfloat16, float8, int4, strings: parsed after all
            tensor.raw_data = bytes(mapping[found.offset : found.offset + found.length])
            continue
        arrays[tensor.name] = _view(mapping, tensor, found.offset, found.length, f"'{path}' is not a valid ONNX model")
    mappings = [mapping] if arrays else []
    external, more = _map_external_data(model, path)
    arrays.update(external)
    return Model.from_proto(model, arrays, [*mappings, *more])


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise PoprtError(f"model file '{path}' does not exist; check {option('input_model')}")


def _not_onnx(path: Path, exc: BaseException) -> PoprtError:
    return PoprtError(f"'{path}' is not a valid ONNX model ({type(exc).__name__}); pass an .onnx file exported by torch.onnx or similar")


def _check_model_proto(model: onnx.ModelProto, path: Path, onnxruntime_ops: bool = False) -> None:
    if not model.graph.node and not model.graph.input:
        raise PoprtError(f"'{path}' is not a valid ONNX model (no graph found); pass an .onnx file")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise PoprtError(
            f"'{path}' uses opset {opset}; poprt-lite needs opset >= {MIN_OPSET} (re-export with a newer opset_version)"
        )
    check_graph(model, f"'{path}'", onnxruntime_ops)


def load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the external data of `model` (saved at `path`) into it, with one-line errors.

    onnx refuses locations outside the model's folder (absolute or with `..`); a missing or short
    data file is reported by name.
    """
    external = _external_tensors(model, path)
    if not external:
        return
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        raise PoprtError(f"cannot read the external data of '{path}': {' '.join(str(exc).split())}") from exc
    for tensor in external:
        expected = _expected_bytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise PoprtError(
                f"external data of '{path}' is truncated: tensor '{tensor.name}' needs {expected} bytes, the file holds {len(tensor.raw_data)}"
            )


def _external_tensors(model: onnx.ModelProto, path: Path) -> list[onnx.TensorProto]:
    """The tensors of `model` with external data, once each data file is known to be safe to read:
    inside the model's folder, and there."""
    external = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
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
    return external


def _map_external_data(model: onnx.ModelProto, path: Path) -> tuple[dict[str, np.ndarray], list[mmap.mmap]]:
    """Map the external data of `model`'s initializers: a numpy view per tensor. Tensors elsewhere
    (in node attributes, subgraphs) or of types numpy cannot view are read into the model."""
    external = _external_tensors(model, path)
    initializers = [t for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    names = {t.name for t in initializers}
    files: dict[str, mmap.mmap] = {}
    arrays = {}
    for tensor in [*(t for t in external if t.name not in names), *initializers]:
        info = external_data_helper.ExternalDataInfo(tensor)
        if tensor.name not in names or _numpy_dtype(tensor) is None:
            try:
                external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
            except (onnx.checker.ValidationError, OSError, ValueError) as exc:
                raise PoprtError(f"cannot read the external data of '{path}': {' '.join(str(exc).split())}") from exc
            continue
        file = path.parent / info.location
        if info.location not in files:
            files[info.location] = _map_file(file, what=f"external data file '{file}'")
        mapping = files[info.location]
        offset = int(info.offset or 0)
        length = _expected_bytes(tensor) if info.length is None else int(info.length)
        if offset + length > len(mapping):
            raise PoprtError(
                f"external data of '{path}' is truncated: tensor '{tensor.name}' needs {length} bytes from offset {offset}, '{file}' holds {len(mapping)}"
            )
        arrays[tensor.name] = _view(mapping, tensor, offset, length, f"external data of '{path}' is invalid")
    return arrays, list(files.values())


def _map_file(path: Path, what: str) -> mmap.mmap | bytes:
    """The file mapped copy-on-write (writes to the mapping never reach the file); an empty file is b""."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return b""
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise PoprtError(f"cannot read {what} ({exc.strerror or exc})") from exc


def _numpy_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    """The little-endian numpy dtype of a tensor of a fixed-size type numpy has, else None."""
    if tensor.data_type not in _FIXED_SIZE_TYPES or tensor.data_type == onnx.TensorProto.BFLOAT16:
        return None
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")


def _view(buffer, tensor: onnx.TensorProto, offset: int, length: int, where: str) -> np.ndarray:
    """`tensor`'s values as a numpy view of `length` bytes of `buffer` from `offset`."""
    dtype = _numpy_dtype(tensor)
    expected = _expected_bytes(tensor)
    if expected != length:
        raise PoprtError(f"{where}: tensor '{tensor.name}' holds {length} bytes, its type and shape {list(tensor.dims)} need {expected}")
    return np.frombuffer(buffer, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(tuple(tensor.dims))


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


def check_graph(model: onnx.ModelProto, what: str = "the model", onnxruntime_ops: bool = False) -> None:
    """Refuse a top-level graph that no pass could handle, naming the problem in one line.

    Checks, in order: every op of the default domain exists at the model's opset (or is a
    model-local function; with `onnxruntime_ops`, for a pipeline that rewrites them, or is one of
    `ONNXRUNTIME_ONNX_OPS`); no tensor is produced twice; every node input is produced by a node, a
    graph input or an initializer; the graph has no cycle. A graph whose nodes are acyclic but out
    of order is put into topological order (exporters sometimes write them unsorted).
    """
    graph = model.graph
    opset = default_opset(model)
    functions = {(f.domain, f.name) for f in model.functions}
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and (node.domain, node.op_type) not in functions and not is_onnx_op(node.op_type, opset):
            if node.op_type not in ONNXRUNTIME_ONNX_OPS:
                raise PoprtError(
                    f"{what} uses op '{node.op_type}' (node '{node.name}'), which is not an ONNX op at opset {opset}; poprt-lite converts standard ONNX models"
                )
            if not onnxruntime_ops:
                raise PoprtError(
                    f"{what} uses onnxruntime's op '{node.op_type}' (node '{node.name}'), which is not an ONNX op at opset {opset} "
                    f"(onnxruntime's transformer optimizer writes it); packing rewrites it into standard ONNX (pass unfuse_ort), or export the model at a newer opset"
                )
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


def is_onnx_op(op_type: str, opset: int) -> bool:
    """Whether ONNX has `op_type` at `opset`."""
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


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


def default_cache_dir() -> Path:
    """Where poprt-lite keeps the models it exports (`~/.cache/poprt-lite`; `POPRT_LITE_CACHE`, else
    `XDG_CACHE_HOME`, moves it): never the repository."""
    root = os.environ.get("POPRT_LITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "poprt-lite"
    )
    return Path(root)


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


# --- the model under conversion -------------------------------------------------------------

# Constants up to this size keep their values in `Model.structure()` (shape inference reads small
# constants: Reshape shapes, Slice bounds); larger ones are declared there as typed graph inputs.
STRUCTURE_INLINE_BYTES = 64 << 10
# Constants of at least this size are written apart from the rest of the model: streamed into the
# file, or into the external data file (onnx's own threshold for external data).
APART_BYTES = 1024
# Tensors in an external data file start at multiples of this (a page, so the file maps well).
EXTERNAL_ALIGNMENT = 4096
# What `Model.export` does with the weights.
ALL, STRUCTURE, APART = "all", "structure", "apart"


class Model:
    """A model under conversion: one onnx-graphsurgeon graph that every pass edits in place, and the
    model-level fields the graph does not hold (`fields`: IR version, producer, doc string, metadata).

    Weights are loaded once and not copied by the pipeline: `open_model` maps the files, so a weight
    is a numpy view into the mapping until a pass replaces it; a model made `from_proto` keeps its
    tensors in that proto. Checks and shape inference see `structure()`, which declares the large
    weights as typed inputs instead of holding them. `save` writes the model once, each weight
    streamed from where it lies into the file.
    """

    def __init__(self, graph: gs.Graph, fields: onnx.ModelProto, mappings: Iterable[object] = ()) -> None:
        self.graph = graph
        self.fields = fields
        self._mappings = list(mappings)  # the mapped files the weights view, open while the model lives

    @classmethod
    def from_proto(cls, model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None, mappings: Iterable[object] = ()) -> Model:
        """The graph of `model` (its tensors stay in `model`), with the initializers named in
        `arrays` taking those values instead."""
        graph = gs.import_onnx(model)
        if arrays:
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Constant) and tensor.name in arrays:
                    tensor.values = arrays[tensor.name]
                    tensor.data_location = None
        return cls(graph, _model_fields(model), mappings)

    def adopt_functions(self, model: onnx.ModelProto) -> None:
        """Make the functions of `model` (an export of this model, e.g. with custom-op bodies
        attached) part of the graph, as importing `model` would."""
        present = {(f.domain, f.name) for f in self.graph.functions}
        for function in model.functions:
            if (function.domain, function.name) not in present:
                self.graph.functions.append(
                    OnnxImporter.import_function(function, model_opset=self.graph.opset, model_import_domains=self.graph.import_domains)
                )

    def metadata(self) -> dict[str, str]:
        return get_metadata(self.fields)

    def set_metadata(self, key: str, value: str) -> None:
        set_metadata(self.fields, key, value)

    def export(self, weights: str = ALL) -> tuple[onnx.ModelProto, list[gs.Constant]]:
        """The model as a ModelProto with the custom-op function bodies it needs, and the constants
        left out of it (see `export_graph` for `weights`)."""
        graph, apart = export_graph(self.graph, weights)
        model = onnx.helper.make_model(
            graph,
            functions=[OnnxExporter.export_function(f) for f in self.graph.functions],
            opset_imports=update_import_domains(self.graph),
        )
        model.ir_version = self.fields.ir_version
        model.producer_name = self.fields.producer_name or "poprt-lite"
        model.producer_version = self.fields.producer_version
        model.doc_string = self.fields.doc_string
        model.model_version = self.fields.model_version
        model.metadata_props.extend(self.fields.metadata_props)
        ops.attach_functions(model)
        return model, apart

    def to_proto(self) -> onnx.ModelProto:
        """The whole model, weights included, as one ModelProto (an in-memory copy of the weights)."""
        return self.export(ALL)[0]

    def structure(self) -> onnx.ModelProto:
        """The model for checks and shape inference: large weights declared, not held."""
        return self.export(STRUCTURE)[0]

    def layout(self) -> tuple[onnx.ModelProto, list[wire.Apart]]:
        """The model without its large weights, and those weights (headers and byte views), for
        `write_model` (one file) or `external_form` + `write_external_data`."""
        model, constants = self.export(APART)
        return model, [_apart(c) for c in constants]

    def size(self) -> int:
        """The bytes `save` writes when the model fits in one file."""
        return wire.model_size(*self.layout())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to `path` atomically, like `save_model`: one file while it fits protobuf's
        2 GB, else with every tensor of at least APART_BYTES in `<name>.data` beside it."""
        path = Path(path)
        model, apart = self.layout()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if wire.model_size(model, apart) <= PROTOBUF_LIMIT:
                atomic_write(path, lambda tmp: _write_to(tmp, lambda f: write_model(model, apart, f)))
            else:
                data_name = f"{path.name}.data"
                skeleton = external_form(model, apart, data_name)
                _replace_pair(
                    path,
                    data_name,
                    lambda f: write_model(skeleton, [], f),
                    lambda f: write_external_data(apart, f),
                )
        except OSError as exc:
            raise PoprtError(f"cannot write '{path}' ({exc.strerror or exc}); check the output path and free space") from exc
        return path


def _model_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model-level fields of `model` that a graph does not hold."""
    fields = onnx.ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        doc_string=model.doc_string,
        model_version=model.model_version,
    )
    fields.metadata_props.extend(model.metadata_props)
    return fields


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` with its weights, keeping the model-level fields of `template` that graphsurgeon drops."""
    return Model(graph, _model_fields(template)).to_proto()


def export_graph(graph: gs.Graph, weights: str = ALL) -> tuple[onnx.GraphProto, list[gs.Constant]]:
    """`graph` as a GraphProto, the way onnx-graphsurgeon exports it, except for the weights:

    - ALL: every constant is an initializer holding its values;
    - STRUCTURE: constants over STRUCTURE_INLINE_BYTES are graph inputs of their type and shape,
      and there is no value_info (checks and shape inference start afresh);
    - APART: numpy-valued constants of at least APART_BYTES are left out and returned, in order,
      to be written after the graph (`write_model`) or as external data.
    """
    initializers, sparse, declared, apart = [], [], [], []
    tensors = graph.tensors()
    for tensor in tensors.values():
        if not isinstance(tensor, gs.Constant):
            continue
        if isinstance(tensor._values, SparseValues):
            sparse.append(OnnxExporter.export_sparse_tensor_proto(tensor))
        elif weights == STRUCTURE and tensor._values.nbytes > STRUCTURE_INLINE_BYTES:
            declared.append(onnx.helper.make_tensor_value_info(tensor.name, dtype_to_onnx(tensor.export_dtype), tensor.shape))
        elif weights == APART and _streamable(tensor):
            apart.append(tensor)
        else:
            initializers.append(OnnxExporter.export_tensor_proto(tensor))
    interface = {t.name for t in [*graph.inputs, *graph.outputs]}
    value_info = [] if weights == STRUCTURE else [
        OnnxExporter.export_value_info_proto(t, do_type_check=False)
        for name, t in tensors.items()
        if name not in interface and isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
    ]
    proto = onnx.helper.make_graph(
        nodes=[OnnxExporter.export_node(node) for node in graph.nodes],
        name=graph.name,
        inputs=[OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs] + declared,
        outputs=[OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs],
        initializer=initializers,
        sparse_initializer=sparse,
        doc_string=graph.doc_string,
        value_info=value_info,
    )
    return proto, apart


def _streamable(tensor: gs.Constant) -> bool:
    values = tensor._values
    return (
        isinstance(values, np.ndarray)
        and values.nbytes >= APART_BYTES
        and values.dtype.kind in "biuf"
        and np.dtype(tensor.export_dtype) == values.dtype
    )


def _apart(tensor: gs.Constant) -> wire.Apart:
    """A numpy-valued constant as a TensorProto header and its little-endian bytes (no copy when the
    array is contiguous and little-endian already)."""
    values = np.ascontiguousarray(tensor._values)
    if values.dtype.byteorder == ">":
        values = values.astype(values.dtype.newbyteorder("<"))
    header = onnx.TensorProto(name=tensor.name, data_type=dtype_to_onnx(values.dtype), dims=values.shape)
    return wire.Apart(header.SerializeToString(), values.reshape(-1).view(np.uint8))


def write_model(model: onnx.ModelProto, apart: Sequence[wire.Apart], stream: BinaryIO) -> int:
    """Serialize `model` and the tensors `apart` into `stream` (see `wire.write_model`)."""
    return wire.write_model(model, apart, stream)


def external_form(model: onnx.ModelProto, apart: Sequence[wire.Apart], location: str) -> onnx.ModelProto:
    """`model` with the tensors `apart` as initializers whose data lies in the external file
    `location`, at the offsets `write_external_data(apart, ...)` writes them to."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor, offset in zip(apart, _external_offsets(apart)):
        header = skeleton.graph.initializer.add()
        header.ParseFromString(tensor.header)
        for key, value in (("location", location), ("offset", offset), ("length", memoryview(tensor.data).nbytes)):
            header.external_data.add(key=key, value=str(value))
        header.data_location = onnx.TensorProto.EXTERNAL
    return skeleton


def write_external_data(apart: Sequence[wire.Apart], stream: BinaryIO) -> int:
    """Write the bytes of the tensors `apart` one after another, each at an EXTERNAL_ALIGNMENT offset."""
    written = 0
    for tensor, offset in zip(apart, _external_offsets(apart)):
        stream.write(bytes(offset - written))
        stream.write(memoryview(tensor.data).cast("B"))
        written = offset + memoryview(tensor.data).nbytes
    return written


def _external_offsets(apart: Sequence[wire.Apart]) -> list[int]:
    offsets, end = [], 0
    for tensor in apart:
        start = -(-end // EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT
        offsets.append(start)
        end = start + memoryview(tensor.data).nbytes
    return offsets


def _write_to(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    with open(path, "wb") as stream:
        write(stream)


def _replace_pair(path: Path, data_name: str, write_model_file: Callable[[BinaryIO], object], write_data: Callable[[BinaryIO], object]) -> None:
    """Write a model and its data file in a temporary folder beside `path`, then rename both into
    place (the data file first), replacing an existing data file rather than appending to it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_to(staging / data_name, write_data)
        _write_to(staging / path.name, write_model_file)
        for name in (data_name, path.name):
            os.chmod(staging / name, _default_file_mode())
        os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def apply_types(graph: gs.Graph, inferred: onnx.ModelProto) -> None:
    """Give the graph's values the types shape inference found (`inferred`, from `structure()`),
    as importing `inferred` would: intermediate values it says nothing about lose theirs."""
    interface = {t.name for t in [*graph.inputs, *graph.outputs]}
    tensors = graph.tensors()
    for name, tensor in tensors.items():
        if isinstance(tensor, gs.Variable) and name not in interface:
            tensor.dtype = tensor.shape = None
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = tensors.get(info.name)
        if isinstance(tensor, gs.Variable) and info.type.ByteSize() > 0:
            tensor.dtype = get_onnx_tensor_dtype(info)
            tensor.shape = get_onnx_tensor_shape(info)
            tensor.type = get_onnx_tensor_type(info)


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
    """Run onnx shape inference (with data propagation) on `graph`'s structure (large weights
    declared, not copied) and copy the inferred shapes and dtypes onto its intermediate tensors,
    replacing what they held before."""
    # Graph outputs keep their declared shapes where inference has nothing better (ops without an
    # inference function); intermediate shapes are recomputed from scratch.
    interface = {t.name for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in interface:
            tensor.shape = None
    structure, _ = export_graph(graph, STRUCTURE)
    model = onnx.helper.make_model(structure, opset_imports=update_import_domains(graph))
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
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


class FreshNames:
    """Names no tensor of a graph has, each handed out once: for a pass that adds many tensors
    (`unique_name` reads the whole graph on every call)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors())

    def __call__(self, name: str) -> str:
        candidate, i = name, 0
        while candidate in self.taken:
            i += 1
            candidate = f"{name}_{i}"
        self.taken.add(candidate)
        return candidate


def unique_name(graph: gs.Graph, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ...: the first that no tensor of `graph` has."""
    tensors = graph.tensors()
    candidate, i = name, 0
    while candidate in tensors:
        i += 1
        candidate = f"{name}_{i}"
    return candidate
