"""Models already run through onnxruntime's transformer optimizer."""

import pytest
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import FusionOptions

from conftest import model_path
from poprt_lite import compile
from poprt_lite.compiler import verify
from poprt_lite.compiler import CompileOptions
from poprt_lite.errors import PassError


def ort_optimized(tmp_path, attention: bool, embeddings: bool | None = None):
    options = FusionOptions("bert")
    options.enable_attention = attention
    options.enable_embed_layer_norm = attention if embeddings is None else embeddings
    optimized = optimizer.optimize_model(
        str(model_path("bert_qa_torchscript")), model_type="bert", num_heads=4, hidden_size=64, optimization_options=options, opt_level=0
    )
    path = tmp_path / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    return path


@pytest.mark.parametrize("mode", ["unpack_repack", "attention_mask"])
def test_fused_layernorm_and_gelu_variants_pack_correctly(tmp_path, mode):
    path = ort_optimized(tmp_path, attention=False)
    options = CompileOptions(input_shape={"input_ids": (4, 32)}, pack_args={"max_valid_num": "6", "segment_max_size": "32", "mode": mode})
    model = compile(path, save=False, options=options).model
    assert {n.op_type for n in model.graph.node if n.domain == "com.microsoft"} >= {"SkipLayerNormalization", "BiasGelu"}
    diffs = verify.max_abs_diff(verify.ir.load_model(model_path("bert_qa_torchscript")), model)
    assert max(diffs.values()) < 1e-4


def test_fused_attention_is_refused_with_advice(tmp_path):
    path = ort_optimized(tmp_path, attention=True)
    options = CompileOptions(pack_args={"max_valid_num": "6", "segment_max_size": "32"})
    with pytest.raises(PassError, match=r"^pass 'export_position_ids' failed: the embeddings are fused into EmbedLayerNormalization node '.*' \(onnxruntime's transformer optimizer\); convert the model before optimizing it$"):
        compile(path, save=False, options=options)


def test_fused_attention_op_is_refused_with_advice(tmp_path):
    path = ort_optimized(tmp_path, attention=True, embeddings=False)
    options = CompileOptions(pack_args={"max_valid_num": "6", "segment_max_size": "32"})
    with pytest.raises(PassError, match=r"^pass 'pack_unpack_repack' failed: node '.*' is a fused Attention op; packing needs the unfused attention \(run poprt-lite before onnxruntime's transformer optimizer\)$"):
        compile(path, save=False, options=options)
