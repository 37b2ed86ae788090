"""The model under conversion (`ir.Model`): opened without reading the weights, exported for checks
without them, written once."""

from __future__ import annotations

import hashlib
import mmap

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import ALL_MODELS, model_path
from poprt_lite import compile, ir
from poprt_lite.compiler import CompileOptions


def mapped(array: np.ndarray) -> bool:
    """Whether `array` views a memory-mapped file (rather than owning a copy)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.initializer[:]
    return copy


def assert_same_model(got: onnx.ModelProto, want: onnx.ModelProto) -> None:
    """The same model, initializers in any order (a saved model holds its large ones last)."""
    assert without_weights(got) == without_weights(want)
    got_weights, want_weights = weights(got), weights(want)
    assert sorted(got_weights) == sorted(want_weights)
    for name, value in want_weights.items():
        assert got_weights[name].dtype == value.dtype and got_weights[name].shape == value.shape, name
        np.testing.assert_array_equal(got_weights[name], value, err_msg=name)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_open_model_maps_the_large_weights_and_exports_what_graphsurgeon_does(name):
    path = model_path(name)
    model = ir.open_model(path)
    constants = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
    large = [t for t in constants if t._values.nbytes >= ir.APART_BYTES]
    assert large and all(isinstance(t._values, np.ndarray) and mapped(t._values) for t in large)
    assert_same_model(model.to_proto(), graphsurgeon_export(onnx.load(path)))


def graphsurgeon_export(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the pass manager exported before it kept one graph: onnx-graphsurgeon's export with
    the model-level fields graphsurgeon drops put back."""
    exported = gs.export_onnx(gs.import_onnx(model), do_type_check=False)
    exported.ir_version = model.ir_version
    exported.producer_name = model.producer_name or "poprt-lite"
    exported.producer_version = model.producer_version
    exported.doc_string = model.doc_string
    exported.model_version = model.model_version
    del exported.metadata_props[:]
    exported.metadata_props.extend(model.metadata_props)
    return exported


@pytest.mark.parametrize("name", ALL_MODELS)
def test_export_matches_graphsurgeon_byte_for_byte(name):
    source = onnx.load(model_path(name))
    want = graphsurgeon_export(source).SerializeToString()
    assert ir.Model.from_proto(source).to_proto().SerializeToString() == want


def test_structure_declares_large_weights_and_keeps_small_ones():
    model = ir.open_model(model_path("bert_qa_torchscript"))
    structure = model.structure()
    sizes = {t.name: t._values.nbytes for t in model.graph.tensors().values() if isinstance(t, gs.Constant)}
    declared = {i.name for i in structure.graph.input} - {t.name for t in model.graph.inputs}
    assert declared == {name for name, size in sizes.items() if size > ir.STRUCTURE_INLINE_BYTES}
    assert {t.name for t in structure.graph.initializer} == {name for name, size in sizes.items() if size <= ir.STRUCTURE_INLINE_BYTES}
    assert not structure.graph.value_info
    onnx.checker.check_model(structure)
    onnx.shape_inference.infer_shapes(structure, check_type=True, strict_mode=True, data_prop=True)


def test_save_writes_one_file_that_reads_back_as_the_model(tmp_path):
    model = ir.open_model(model_path("bert_qa_torchscript"))
    path = model.save(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert path.stat().st_size == model.size()
    assert_same_model(onnx.load(path), model.to_proto())


def test_save_over_the_limit_writes_aligned_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ir, "PROTOBUF_LIMIT", 100_000)
    model = ir.open_model(model_path("bert_qa_torchscript"))
    path = model.save(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    skeleton = onnx.load(path, load_external_data=False)
    external = [t for t in skeleton.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert external and all(int(onnx.external_data_helper.ExternalDataInfo(t).offset) % ir.EXTERNAL_ALIGNMENT == 0 for t in external)
    assert path.stat().st_size < 100_000
    reopened = ir.open_model(path)  # external data mapped too
    assert all(mapped(t._values) for t in reopened.graph.tensors().values() if isinstance(t, gs.Constant) and t.name in {e.name for e in external})
    assert_same_model(onnx.load(path), model.to_proto())
    assert_same_model(reopened.to_proto(), model.to_proto())


def test_a_pass_writing_into_a_mapped_weight_never_changes_the_source_file(tmp_path):
    source = tmp_path / "src.onnx"
    source.write_bytes(model_path("bert_qa_torchscript").read_bytes())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    model = ir.open_model(source)
    table = next(t for t in model.graph.tensors().values() if isinstance(t, gs.Constant) and t.name.endswith("word_embeddings.weight"))
    table.values[:] = 0  # in place, copy-on-write
    model.save(tmp_path / "out.onnx")
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    assert not weights(onnx.load(tmp_path / "out.onnx"))[table.name].any()


def test_compile_keeps_untouched_weights_mapped_and_writes_the_same_model(tmp_path):
    """The pipeline copies no weight it does not change: after a packing conversion every large
    weight of the converted graph still views the mapped source file."""
    options = CompileOptions(
        input_shape={"input_ids": (2, 16), "attention_mask": (2, 16), "token_type_ids": (2, 16)},
        pack_args={"max_valid_num": "4", "segment_max_size": "16", "mode": "attention_mask"},
    )
    result = compile(model_path("bert_qa_torchscript"), tmp_path / "out.onnx", options=options)
    source = weights(onnx.load(model_path("bert_qa_torchscript")))
    constants = {t.name: t._values for t in result.converted.graph.tensors().values() if isinstance(t, gs.Constant)}
    kept = [name for name in constants if name in source and source[name].nbytes >= ir.APART_BYTES]
    assert len(kept) == sum(v.nbytes >= ir.APART_BYTES for v in source.values())
    assert all(mapped(constants[name]) for name in kept)
    assert_same_model(onnx.load(tmp_path / "out.onnx"), result.model)


def test_truncated_inline_weights_are_refused(tmp_path):
    """A tensor whose raw_data does not match its shape (as a careless edit leaves it)."""
    model = onnx.load(model_path("bert_qa_torchscript"))
    tensor = next(t for t in model.graph.initializer if len(t.raw_data) >= ir.APART_BYTES)
    tensor.raw_data = tensor.raw_data[:-4]
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, path)
    with pytest.raises(ir.PoprtError) as info:
        ir.open_model(path)
    need = int(np.prod(tensor.dims)) * 4
    assert str(info.value) == (
        f"'{path}' is not a valid ONNX model: tensor '{tensor.name}' holds {need - 4} bytes, its type and shape {list(tensor.dims)} need {need}"
    )
