"""unfuse_ort (issue 24.3): models from onnxruntime's transformer optimizer pack in every mode.

- Each fused op, on a small hand-built graph, rewritten into standard ONNX gives what onnxruntime's
  own kernel gives, on right-padded batches.
- The optimizer's own output (testdata's bert_qa_ort_optimized and st_mean_norm_ort_optimized, and
  bert_qa_torchscript optimized here with other fusion options, or saved from an onnxruntime
  session): no onnxruntime op is left, the graph is what an exporter writes, and every request of
  the packed model equals the optimized model run alone on it, in every mode.
- What cannot be rewritten is refused naming the node and what to do; a model without fused ops
  is left as it is.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

from conftest import model_path, run
from passes.test_pack_passes import MODES, run_packed
from poprt_lite import compile, ir
from poprt_lite.compiler import CompileOptions, verify
from poprt_lite.runtime import modes as pack_modes
from poprt_lite.errors import PassError, PoprtError
from poprt_lite.passes import PassManager, get_pass
from poprt_lite.patterns.attention import find_attention_blocks
from poprt_lite.tools.diff import diff_models

ORT = ir.ORT_DOMAIN
B, S, HIDDEN, HEADS, VOCAB_ROWS = 2, 5, 8, 2, 20
LENGTHS = [5, 3]  # right padding, as onnxruntime's mask lengths require
OPTIMIZED = ["bert_qa_ort_optimized", "st_mean_norm_ort_optimized"]
PACK = {"max_valid_num": "6", "segment_max_size": "32"}


def unfused(model: onnx.ModelProto) -> onnx.ModelProto:
    return PassManager([get_pass("unfuse_ort")()]).run(model)[0]


def histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node))


def ort_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.domain == ORT or (n.op_type in ir.ONNXRUNTIME_ONNX_OPS and not ir.is_onnx_op(n.op_type, ir.default_opset(model)))]


# ---------------------------------------------------------------- one fused op against onnxruntime's kernel

RNG = np.random.default_rng(24)


def weight(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def fused_model(nodes, inputs, outputs, initializers, opset: int = 17, rank: int = 3) -> onnx.ModelProto:
    """`outputs`: float tensors of rank `rank` but mask_index (int32 [B])."""
    values = [
        helper.make_tensor_value_info(o, TensorProto.INT32, ["b"]) if o == "mask_index" else helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"d{i}" for i in range(rank)])
        for o in outputs
    ]
    graph = helper.make_graph(nodes, "fused", inputs, values, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ORT, 1)])
    model.ir_version = 8
    return model


def hidden_input(name: str = "x", shape=(B, S, HIDDEN)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


MASK_INPUT = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])
MASK_FEEDS = {"attention_mask": (np.arange(S)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)}


def mask_nodes(form: str) -> tuple[list, str]:
    """The mask_index of `form` computed from the attention_mask input, as the optimizer writes it."""
    cast = helper.make_node("Cast", ["attention_mask"], ["mask_int32"], to=TensorProto.INT32)
    if form == "lengths":
        axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64)))
        return [cast, axes, helper.make_node("ReduceSum", ["mask_int32", "axes"], ["mask_index"], keepdims=0)], "mask_index"
    if form == "raw":
        return [cast], "mask_int32"
    return [], ""


def assert_rewrite_matches_kernel(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    rewritten = unfused(model)
    assert ort_nodes(model) and not ort_nodes(rewritten)
    assert ORT not in {i.domain for i in rewritten.opset_import}
    for want, got in zip(run(model, feeds), run(rewritten, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    return rewritten


def x_feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((B, S, HIDDEN)).astype(np.float32)}


ATTENTION_CASES = {  # id -> (mask form, attributes, attention_bias)
    "lengths": ("lengths", {}, False),
    "raw_mask": ("raw", {}, False),
    "no_mask": ("", {}, False),
    "filter_and_scale": ("raw", {"mask_filter_value": -3.0, "scale": 0.3}, False),
    "narrow_v_and_bias": ("lengths", {"qkv_hidden_sizes": [HIDDEN, HIDDEN, 4]}, True),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_equals_the_kernel(case):
    form, attrs, with_bias = ATTENTION_CASES[case]
    sizes = attrs.get("qkv_hidden_sizes", [HIDDEN] * 3)
    nodes, mask_index = mask_nodes(form)
    inputs = ["x", "qkv_weight", "qkv_bias", mask_index] + (["", "attention_bias"] if with_bias else [])
    nodes.append(helper.make_node("Attention", inputs, ["y"], "attention", domain=ORT, num_heads=HEADS, **attrs))
    inits = [weight("qkv_weight", HIDDEN, sum(sizes)), weight("qkv_bias", sum(sizes)), weight("attention_bias", 1, HEADS, S, S)]
    model = fused_model(nodes, [hidden_input(), MASK_INPUT], ["y"], inits)
    rewritten = assert_rewrite_matches_kernel(model, {**x_feeds(), **MASK_FEEDS})
    ops = histogram(rewritten)
    assert (ops["MatMul"], ops["Softmax"], ops["Reshape"], ops["Transpose"]) == (5, 1, 4, 4)
    assert ops.get("Sub", 0) == (1 if form else 0)  # (1 - mask) * filter, from the attention_mask input


@pytest.mark.parametrize("form", ["lengths", "raw"])
def test_multi_head_attention_equals_the_kernel(form):
    nodes, mask_index = mask_nodes(form)
    nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [p], f"{p}_projection") for p in "qkv"]
    nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v", "qkv_bias", mask_index, "attention_bias"], ["y"], "mha", domain=ORT, num_heads=HEADS))
    inits = [weight(f"w{p}", HIDDEN, HIDDEN) for p in "qkv"] + [weight("qkv_bias", 3 * HIDDEN), weight("attention_bias", 1, HEADS, S, S)]
    model = fused_model(nodes, [hidden_input(), MASK_INPUT], ["y"], inits)
    assert_rewrite_matches_kernel(model, {**x_feeds(), **MASK_FEEDS})


def embeddings_model(segments: bool, position_ids: bool, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    """EmbedLayerNormalization on int32 casts of the id inputs, as the optimizer writes it, its
    mask_index feeding an Attention (`y`)."""
    ids = [("input_ids", True), ("token_type_ids", segments), ("attention_mask", True), ("position_ids", position_ids)]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [B, S]) for name, present in ids if present]
    nodes = [helper.make_node("Cast", [name], [f"{name}_int32"], to=TensorProto.INT32) for name, present in ids if present]
    eln_inputs = ["input_ids_int32", "token_type_ids_int32" if segments else "", "word", "position", "segment" if segments else "", "gamma", "beta", "attention_mask_int32"]
    eln_inputs += ["position_ids_int32"] if position_ids else []
    nodes += [
        helper.make_node("EmbedLayerNormalization", eln_inputs, ["embedded", "mask_index", "embedding_sum"], "embed", domain=ORT, epsilon=1e-12),
        helper.make_node("Attention", ["embedded", "qkv_weight", "qkv_bias", "mask_index"], ["y"], "attention", domain=ORT, num_heads=HEADS),
    ]
    inits = [weight("word", VOCAB_ROWS, HIDDEN), weight("position", 16, HIDDEN), weight("segment", 2, HIDDEN)]
    inits += [weight("gamma", HIDDEN), weight("beta", HIDDEN), weight("qkv_weight", HIDDEN, 3 * HIDDEN), weight("qkv_bias", 3 * HIDDEN)]
    return fused_model(nodes, inputs, outputs, inits, opset)


def id_feeds() -> dict[str, np.ndarray]:
    return {
        "input_ids": RNG.integers(0, VOCAB_ROWS, (B, S)),
        "token_type_ids": RNG.integers(0, 2, (B, S)),
        "position_ids": np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]),
        **MASK_FEEDS,
    }


@pytest.mark.parametrize(
    "segments, position_ids, outputs, opset",
    [
        (True, False, ["y"], 17),
        (True, False, ["y", "embedding_sum", "mask_index"], 17),
        (False, True, ["y", "embedded"], 17),
        (True, True, ["y", "embedded"], 14),  # layer normalization spelled out
    ],
)
def test_embed_layer_normalization_equals_the_kernel(segments, position_ids, outputs, opset):
    model = embeddings_model(segments, position_ids, outputs, opset)
    rewritten = assert_rewrite_matches_kernel(model, id_feeds())
    gathers = [n for n in rewritten.graph.node if n.op_type == "Gather" and n.input[0] in ("word", "position", "segment")]
    # The tables are looked up with the int64 inputs themselves, the positions with the position_ids
    # input or a Range over the sequence that export_position_ids turns into that input.
    assert {n.input[0]: n.input[1] for n in gathers if n.input[0] != "position"} == {"word": "input_ids", **({"segment": "token_type_ids"} if segments else {})}
    position = next(n for n in gathers if n.input[0] == "position")
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    assert position.input[1] == "position_ids" if position_ids else producers[producers[position.input[1]].input[0]].op_type == "Range"


SKIP_CASES = {  # id -> (op, inputs after input and skip, outputs, opset)
    "bias_and_sum": ("SkipLayerNormalization", ["gamma", "beta", "bias"], ["y", "", "", "sum"], 17),
    "no_beta_no_bias": ("SkipLayerNormalization", ["gamma"], ["y"], 17),
    "spelled_out": ("SkipLayerNormalization", ["gamma", "beta", "bias"], ["y", "", "", "sum"], 14),
    "simplified": ("SkipSimplifiedLayerNormalization", ["gamma", "bias"], ["y", "", "", "sum"], 17),
}


@pytest.mark.parametrize("case", SKIP_CASES)
def test_skip_layer_normalization_equals_the_kernel(case):
    op, rest, outputs, opset = SKIP_CASES[case]
    node = helper.make_node(op, ["x", "skip", *rest], outputs, "skip_norm", domain=ORT, epsilon=1e-5)
    inits = [weight("gamma", HIDDEN), weight("beta", HIDDEN), weight("bias", HIDDEN)]
    model = fused_model([node], [hidden_input(), hidden_input("skip")], [o for o in outputs if o], inits, opset)
    rewritten = assert_rewrite_matches_kernel(model, {**x_feeds(), "skip": RNG.standard_normal((B, S, HIDDEN)).astype(np.float32)})
    assert ("LayerNormalization" in histogram(rewritten)) == (opset >= 17 and op == "SkipLayerNormalization")


ACTIVATIONS = {  # id -> (op, inputs, attributes)
    "bias_gelu": ("BiasGelu", ["x", "bias"], {}),
    "gelu": ("Gelu", ["x"], {}),
    "fast_gelu": ("FastGelu", ["x"], {}),
    "fast_gelu_bias": ("FastGelu", ["x", "bias"], {}),
    "quick_gelu": ("QuickGelu", ["x"], {}),
    "quick_gelu_alpha_1": ("QuickGelu", ["x"], {"alpha": 1.0}),
}


@pytest.mark.parametrize("case", ACTIVATIONS)
def test_activation_equals_the_kernel(case):
    op, inputs, attrs = ACTIVATIONS[case]
    node = helper.make_node(op, inputs, ["y"], "activation", domain=ORT, **attrs)
    model = fused_model([node], [hidden_input()], ["y"], [weight("bias", HIDDEN)])
    feeds = {"x": (RNG.standard_normal((B, S, HIDDEN)) * 3).astype(np.float32)}
    assert_rewrite_matches_kernel(model, feeds)


@pytest.mark.parametrize("attrs", [{"alpha": 0.25}, {"transA": 1, "transB": 1, "alpha": 0.5}, {"transB": 1}])
def test_fused_matmul_equals_the_kernel(attrs):
    a = (3, 4, 6, 5) if attrs.get("transA") else (3, 4, 5, 6)
    b = (3, 4, 7, 6) if attrs.get("transB") else (3, 4, 6, 7)
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], "matmul", domain=ORT, **attrs)
    model = fused_model([node], [hidden_input("a", a), hidden_input("b", b)], ["y"], [], rank=4)
    feeds = {"a": RNG.standard_normal(a).astype(np.float32), "b": RNG.standard_normal(b).astype(np.float32)}
    assert_rewrite_matches_kernel(model, feeds)


@pytest.mark.parametrize("op, inputs", [("LayerNormalization", ["x", "gamma", "beta"]), ("LayerNormalization", ["x", "gamma"]), ("SimplifiedLayerNormalization", ["x", "gamma"])])
def test_onnxruntime_normalizations_of_the_onnx_domain_are_spelled_out(op, inputs):
    """onnxruntime's optimizer writes LayerNormalization at any opset; before 17 it is onnxruntime's own."""
    node = helper.make_node(op, inputs, ["y"], "norm", epsilon=1e-5)
    model = fused_model([node], [hidden_input()], ["y"], [weight("gamma", HIDDEN), weight("beta", HIDDEN)], opset=14)
    rewritten = assert_rewrite_matches_kernel(model, x_feeds())
    assert histogram(rewritten)["ReduceSum"] == (2 if op == "LayerNormalization" else 1)


# ---------------------------------------------------------------- the optimizer's models


def assert_attention_as_exported(model: onnx.ModelProto) -> None:
    """Two attention blocks the patterns find, each adding one term to its scores: the one additive
    mask of both layers, computed from the attention_mask input alone."""
    blocks = find_attention_blocks(ir.to_graph(model), ["attention_mask"], ["input_ids"])
    summands = [[s for term in block.terms for s in term.summands] for block in blocks]
    assert len(blocks) == 2 and all(len(s) == 1 for s in summands)
    mask = summands[0][0]
    assert summands[1][0] is mask
    inputs, stack = set(), [mask]
    while stack:
        tensor = stack.pop()
        if tensor.inputs:
            stack.extend(tensor.inputs[0].inputs)
        elif isinstance(tensor, gs.Variable):
            inputs.add(tensor.name)
    assert inputs == {"attention_mask"}


def test_bert_from_the_optimizer_unfuses_into_what_the_exporter_writes():
    model = unfused(ir.load_model(model_path("bert_qa_ort_optimized")))
    assert histogram(model) == {
        "Gather": 4, "Shape": 1, "Range": 1, "Unsqueeze": 2, "Add": 23, "LayerNormalization": 5,  # embeddings, 4 skip norms
        "MatMul": 17, "Reshape": 8, "Transpose": 8, "Mul": 7, "Softmax": 2,  # 2 x (Q, K, V, scores, context, output, FFN x2), QA head
        "Cast": 1, "Sub": 1,  # one additive mask from attention_mask, for both layers
        "Div": 2, "Erf": 2, "Split": 1, "Squeeze": 2,
    }  # fmt: skip
    original = ir.load_model(model_path("bert_qa_torchscript"))
    same = ("MatMul", "Softmax", "Erf", "LayerNormalization", "Transpose")
    assert {op: histogram(model)[op] for op in same} == {op: histogram(original)[op] for op in same}
    assert_attention_as_exported(model)


def test_minilm_from_the_optimizer_unfuses_at_opset_14():
    model = unfused(ir.load_model(model_path("st_mean_norm_ort_optimized")))
    ops = histogram(model)
    assert not ort_nodes(model) and "LayerNormalization" not in ops
    assert (ops["Softmax"], ops["MatMul"], ops["Erf"], ops["Sqrt"], ops["ReduceSum"]) == (2, 16, 2, 5, 12)  # ReduceSum: 5 norms x 2, pooling 2
    assert_attention_as_exported(model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZED)
def test_packed_optimized_model_equals_it_per_request(name, mode):
    """Every request of the packed model equals the optimized model run alone on it (what
    onnxruntime's fused kernels give), wherever it lands in the batch."""
    batch, results = run_packed(name, mode, [16, 3, 11, 1, 7])  # one batch in every mode
    assert batch.count == len(results) == 5
    for want, got in results:
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


VARIANTS = {  # fusion options of onnxruntime's optimizer besides its defaults (testdata's bert_qa_ort_optimized)
    "raw_mask": ({"attention_mask_format": AttentionMaskFormat.AttentionMask}, {"Attention", "EmbedLayerNormalization"}),
    "lengths_by_reduce_sum": ({"enable_embed_layer_norm": False}, {"Attention", "SkipLayerNormalization"}),
    "multi_head_attention": ({"use_multi_head_attention": True}, {"MultiHeadAttention", "EmbedLayerNormalization"}),
    "fast_gelu": ({"enable_gelu_approximation": True}, {"FastGelu"}),
    "gelu_and_skip_norm_without_bias": ({"enable_bias_gelu": False, "enable_bias_skip_layer_norm": False}, {"Gelu", "SkipLayerNormalization"}),
}


@functools.cache
def optimized_variant(variant: str, folder: str) -> str:
    path = f"{folder}/{variant}.onnx"
    if variant == "session_extended":  # onnxruntime's own graph optimizations, saved from a session: FusedMatMul, BiasGelu
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        ort.InferenceSession(str(model_path("bert_qa_torchscript")), options, providers=["CPUExecutionProvider"])
        return path
    fusion = FusionOptions("bert")
    for key, value in VARIANTS[variant][0].items():
        setattr(fusion, key, value)
    optimizer.optimize_model(str(model_path("bert_qa_torchscript")), model_type="bert", num_heads=4, hidden_size=64, optimization_options=fusion).save_model_to_file(path)
    return path


@pytest.fixture(scope="module")
def variants_folder(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ort_variants"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", [*VARIANTS, "session_extended"])
def test_other_fusions_pack_and_equal_the_optimized_model(variant, mode, variants_folder):
    path = optimized_variant(variant, variants_folder)
    fused = {n.op_type for n in onnx.load(path).graph.node if n.domain == ORT}
    assert fused >= (VARIANTS[variant][1] if variant in VARIANTS else {"FusedMatMul", "BiasGelu"})
    pack_args = {**PACK, "mode": mode}
    options = CompileOptions(pack_args={**pack_args, "max_tokens": "64"}) if not pack_modes.get(mode).static else CompileOptions(input_shape={"input_ids": (2, 32)}, pack_args=pack_args)
    result = compile(path, save=False, options=options)
    assert result.records[0].name == "unfuse_ort" and result.records[0].changed
    assert not ort_nodes(result.model)
    assert max(verify.max_abs_diff(path, result.model).values()) < 1e-4


# ---------------------------------------------------------------- left alone, refused


def test_model_without_onnxruntime_ops_is_left_as_it_is():
    source = ir.load_model(model_path("bert_qa_torchscript"))
    result, records = PassManager([get_pass("unfuse_ort")()]).run(source)
    assert (records[0].changed, records[0].message) == (False, "no onnxruntime fused ops; model unchanged")
    assert diff_models(source, result).equal


def test_packing_runs_it_first_and_it_changes_nothing_else():
    options = CompileOptions(input_shape={"input_ids": (2, 32)}, pack_args=PACK)
    result = compile(model_path("bert_qa_torchscript"), save=False, options=options)
    without = compile(model_path("bert_qa_torchscript"), save=False, options=CompileOptions(input_shape={"input_ids": (2, 32)}, pack_args=PACK, skip_passes=["unfuse_ort"]))
    assert [r.name for r in result.records][:2] == ["unfuse_ort", "eliminate_identity"] and not result.records[0].changed
    assert diff_models(without.model, result.model).equal


def refused(model: onnx.ModelProto) -> str:
    with pytest.raises(PassError) as info:
        unfused(model)
    return str(info.value)


def test_causal_attention_is_refused():
    node = helper.make_node("Attention", ["x", "qkv_weight", "qkv_bias"], ["y"], "decoder_attention", domain=ORT, num_heads=HEADS, unidirectional=1)
    model = fused_model([node], [hidden_input()], ["y"], [weight("qkv_weight", HIDDEN, 3 * HIDDEN), weight("qkv_bias", 3 * HIDDEN)])
    assert refused(model) == (
        "pass 'unfuse_ort' failed: Attention node 'decoder_attention' is unidirectional (causal, a decoder's attention); packing is for bidirectional encoders"
    )


def test_op_it_does_not_know_is_refused():
    node = helper.make_node("FusedGemm", ["x", "w"], ["y"], "pooler_dense", domain=ORT, activation="Tanh")
    model = fused_model([node], [hidden_input("x", (B, HIDDEN))], ["y"], [weight("w", HIDDEN, HIDDEN)], rank=2)
    assert refused(model) == (
        "pass 'unfuse_ort' failed: node 'pooler_dense' is onnxruntime's FusedGemm (com.microsoft), which unfuse_ort does not turn into "
        "standard ONNX; pack the model as exported, before onnxruntime's transformer optimizer, or optimize it with that fusion off"
    )


def test_mask_of_another_origin_is_refused():
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_int32"], to=TensorProto.INT32),
        helper.make_node("Neg", ["mask_int32"], ["flipped"], "flip"),
        helper.make_node("Attention", ["x", "qkv_weight", "qkv_bias", "flipped"], ["y"], "attention", domain=ORT, num_heads=HEADS),
    ]
    model = fused_model(nodes, [hidden_input(), MASK_INPUT], ["y"], [weight("qkv_weight", HIDDEN, 3 * HIDDEN), weight("qkv_bias", 3 * HIDDEN)])
    assert refused(model) == (
        "pass 'unfuse_ort' failed: Attention node 'attention' takes its mask 'flipped' from Neg node 'flip'; unfuse_ort rebuilds the masks "
        "that come from a [batch, sequence] attention-mask input (0/1, or its lengths); pack the model as exported, before onnxruntime's transformer optimizer"
    )


def test_skipping_it_leaves_the_fused_model_refused_with_advice():
    options = CompileOptions(input_shape={"input_ids": (2, 32)}, pack_args=PACK, skip_passes=["unfuse_ort"])
    with pytest.raises(PassError, match=r"^pass 'export_position_ids' failed: the embeddings are fused into EmbedLayerNormalization node 'EmbedLayerNormalization_0' \(onnxruntime's transformer optimizer\); run unfuse_ort before export_position_ids \(the default pipeline does\)$"):
        compile(model_path("bert_qa_ort_optimized"), save=False, options=options)


def test_a_pipeline_without_it_refuses_fused_attention_with_advice(variants_folder):
    path = optimized_variant("lengths_by_reduce_sum", variants_folder)  # standard embeddings, fused attention
    options = CompileOptions(input_shape={"input_ids": (2, 32)}, pack_args=PACK, pipeline=["export_position_ids", "pack_unpack_repack", "static_shape"])
    with pytest.raises(PassError, match=r"^pass 'pack_unpack_repack' failed: node 'Attention_0' is a fused Attention op \(onnxruntime's transformer optimizer\); run unfuse_ort before packing \(the default pipeline does\)$"):
        compile(path, save=False, options=options)


def test_onnxruntime_layer_norm_before_opset_17_is_refused_without_packing():
    with pytest.raises(PoprtError) as info:
        compile(model_path("st_mean_norm_ort_optimized"), save=False, options=CompileOptions(input_shape={"input_ids": (2, 32)}))
    assert str(info.value) == (
        f"'{model_path('st_mean_norm_ort_optimized')}' uses onnxruntime's op 'LayerNormalization' (node 'LayerNorm_0'), which is not an ONNX op "
        "at opset 14 (onnxruntime's transformer optimizer writes it); packing rewrites it into standard ONNX (pass unfuse_ort), or export the model at a newer opset"
    )
