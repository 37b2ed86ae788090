"""PopRT's Python API: `poprt_lite.Converter(...).convert(model)` and `poprt_lite.compiler.Compiler`."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

import poprt_lite
from conftest import model_path
from poprt_lite import compile, ir
from poprt_lite.compiler import CompileOptions, Compiler, CompilerOptions
from poprt_lite.errors import PoprtError
from poprt_lite.passes import register_pass
from poprt_lite.runtime import ModelRunner
from poprt_lite.tools.diff import diff_models

BERT = model_path("bert_qa_torchscript")
SHAPE = {"input_ids": [2, 16], "attention_mask": [2, 16], "token_type_ids": [2, 16]}


def test_converter_gives_the_graph_compile_gives_for_the_same_flags():
    model = onnx.load(BERT)
    before = model.SerializeToString()
    converted = poprt_lite.Converter(
        input_shape=SHAPE, precision="fp16", used_passes=["insert_attention_mask"], convert_version=11, remap_mode=["after_matmul"],
    ).convert(model)
    assert model.SerializeToString() == before  # the caller's model is left alone
    options = CompileOptions(precision="fp16", input_shape={k: tuple(v) for k, v in SHAPE.items()}, passes=["insert_attention_mask"])
    expected = compile(BERT, save=False, options=options).model
    assert diff_models(expected, converted).equal
    assert ir.get_metadata(converted)["precision"] == "fp16"


def test_converter_check_names_an_output_a_pass_dropped(caplog):
    @register_pass("drop_end_logits_test")
    def drop_end_logits_test(graph, ctx) -> bool:
        """Drop the output end_logits unasked (what check must not pass over)."""
        graph.outputs = [t for t in graph.outputs if t.name != "end_logits"]
        return True

    with caplog.at_level(logging.WARNING):
        poprt_lite.Converter(check=True, used_passes=["drop_end_logits_test"]).convert(onnx.load(BERT))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (
        "check: the converted model lacks output 'end_logits', which the source model has "
        "(to drop it on purpose: remove_outputs end_logits)"
    )
    assert [m.split(" max abs diff ")[0] for m in messages[1:]] == ["check: start_logits"]


def test_converter_check_compares_the_outputs_left_by_remove_outputs(caplog):
    with caplog.at_level(logging.WARNING):
        poprt_lite.Converter(check=True, remove_outputs=["end_logits"]).convert(onnx.load(BERT))
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("check: start_logits max abs diff ") and float(message.rsplit(" ", 1)[1]) < 1e-4


def test_converter_takes_popRT_pack_args_values():
    converted = poprt_lite.Converter(
        input_shape=SHAPE, pack_args={"max_valid_num": 5, "segment_max_size": [16], "dynamic_groups": [["input_ids"]]}
    ).convert(onnx.load(BERT))
    assert ir.get_metadata(converted)["pack"] == '{"mode": "unpack_repack", "max_valid_num": 5, "segment_max_size": 16}'


def test_converter_ipu_keywords_notice_or_refuse(caplog):
    with caplog.at_level(logging.WARNING):
        poprt_lite.Converter(enable_insert_remap=True, disable_progress_bar=True)
    assert [r.getMessage() for r in caplog.records] == [
        "enable_insert_remap does not apply, ignored: Remap ops rearrange IPU tensor layouts; onnxruntime has none to rearrange",
        "disable_progress_bar does not apply, ignored: there is no compilation progress bar (--quiet prints errors only)",
    ]
    with pytest.raises(PoprtError, match=r"^eightbitsio is not supported: turns image inputs into uint8"):
        poprt_lite.Converter(eightbitsio=True)
    with pytest.raises(PoprtError, match=r"^quantize is not supported: FP8 is an IPU number format"):
        poprt_lite.Converter(quantize=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        poprt_lite.Converter(colour="red")


def test_compiler_compiles_to_an_artifact_and_exports_it(tmp_path, caplog):
    converted = poprt_lite.Converter(input_shape=SHAPE).convert(onnx.load(BERT))
    options = CompilerOptions(batches_per_step=1, num_ipus=1)
    with caplog.at_level(logging.WARNING):
        executable = Compiler.compile(converted, ["start_logits"], options)
    assert [r.getMessage() for r in caplog.records] == ["CompilerOptions batches_per_step, num_ipus do not apply, ignored: they configure the IPU compiler"]
    assert [o["name"] for o in executable.manifest["outputs"]] == ["start_logits"]
    feeds = {"input_ids": np.ones((2, 16), np.int64), "attention_mask": np.ones((2, 16), np.int64), "token_type_ids": np.zeros((2, 16), np.int64)}
    (start,) = ModelRunner(executable).run(["start_logits"], feeds)
    Compiler.compile_and_export(converted, None, tmp_path / "executable.popef")
    (again, _) = ModelRunner(tmp_path / "executable.popef").run(["start_logits", "end_logits"], feeds)
    np.testing.assert_array_equal(start, again)
    with pytest.raises(PoprtError, match=r"^outputs names 'logits', which is not a model output; outputs are: start_logits, end_logits$"):
        Compiler.compile(converted, ["logits"])
