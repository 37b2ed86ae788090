"""Golden tests: every built-in pass on a tiny model, the result checked in as canonical text.

Each case runs one pass through `PassManager` and compares the result with
`expected/<pass>__<model>.txt`, written in ONNX's textual syntax (`onnx.printer`) after
canonicalisation: node names cleared (they carry no meaning), `value_info` dropped (derived by
shape inference), and initializers or tensor attributes that are large or not printable as text
(float16 and co.) replaced by a string holding their dtype, shape and sha256 (or their values when
tiny), so a golden stays small. Goldens are compared with `poprt-lite diff` semantics: the test
passes when the golden and the result compute the same graph, and on failure shows the structural
report followed by the unified text diff.

Adding a pass: add a `GoldenCase` to `CASES` (and, if no model fits, a model to `MODELS`), then
run `pytest tests/golden --update-goldens` and review the new file in the git diff.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx.parser
import onnx.printer
import pytest

from poprt_lite.passes import PassManager, get_pass, list_passes
from poprt_lite.tools.diff import PREVIEW_ELEMENTS, diff_models, format_report, tensor_summary

EXPECTED = Path(__file__).resolve().parent / "expected"
REFRESH = "pytest tests/golden --update-goldens"

# Input models, in ONNX's textual syntax (what the goldens are written in, too).
MODELS = {
    # An Identity inside the graph, one giving an output its name, one copying an input to an output.
    "identity_chain": """
        <ir_version: 8, opset_import: ["" : 17]>
        identity_chain (float[2,3] x) => (float[2,3] y, float[2,3] x_copy) {
            a = Identity (x)
            b = Relu (a)
            y = Identity (b)
            x_copy = Identity (x)
        }
    """,
    # A branch no output depends on, with its own initializer.
    "dead_branch": """
        <ir_version: 8, opset_import: ["" : 17]>
        dead_branch (float[2,3] x) => (float[2,3] y) <float[3] unused_bias = {1, 2, 3}> {
            y = Relu (x)
            dead = Add (x, unused_bias)
            also_dead = Sigmoid (dead)
        }
    """,
    # Two heads on one trunk, each with a branch of its own and its own initializer.
    "two_heads": """
        <ir_version: 8, opset_import: ["" : 17]>
        two_heads (float[2,3] x) => (float[2,3] start, float[2,3] end) <float[3] end_bias = {1, 2, 3}> {
            trunk = Relu (x)
            start = Sigmoid (trunk)
            shifted = Add (trunk, end_bias)
            end = Tanh (shifted)
        }
    """,
    # Arithmetic on constants only (initializers and a Constant node) next to a real input.
    "constant_arithmetic": """
        <ir_version: 8, opset_import: ["" : 17]>
        constant_arithmetic (float[N,3] x) => (float[N,3] y) <float[3] a = {1, 2, 3}, float[3] b = {10, 20, 30}> {
            two = Constant <value = float[1] {2}> ()
            ab = Add (a, b)
            scaled = Mul (ab, two)
            y = Add (x, scaled)
        }
    """,
    # A shape computed from a dynamic input: constant once the input dims are pinned.
    "shape_arithmetic": """
        <ir_version: 8, opset_import: ["" : 17]>
        shape_arithmetic (float[batch,seq] x) => (float[batch,seq] y) <int64[1] flat_shape = {-1}> {
            shape = Shape (x)
            flat = Reshape (x, flat_shape)
            activated = Relu (flat)
            y = Reshape (activated, shape)
        }
    """,
    # BERT-style embeddings: position ids sliced from a buffer by Shape(input_ids).
    "embeddings": """
        <ir_version: 8, opset_import: ["" : 17]>
        embeddings (int64[batch,seq] input_ids) => (float[batch,seq,2] embedded)
            <float[8,2] word_table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
             float[8,2] position_table = {0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5},
             int64[1,8] position_buffer = {0, 1, 2, 3, 4, 5, 6, 7},
             int64 one = {1}, int64[1] zero_1d = {0}, int64[1] one_1d = {1}>
        {
            words = Gather (word_table, input_ids)
            shape = Shape (input_ids)
            seq = Gather (shape, one)
            seq_1d = Unsqueeze (seq, zero_1d)
            position_ids_computed = Slice (position_buffer, zero_1d, seq_1d, one_1d)
            positions = Gather (position_table, position_ids_computed)
            embedded = Add (words, positions)
        }
    """,
    # float32 weights, a Constant beyond float16's range, float32 graph input and output.
    "small_mlp": """
        <ir_version: 8, opset_import: ["" : 17]>
        small_mlp (float[batch,4] x) => (float[batch,2] y)
            <float[4,2] w = {0.5, -1, 0.25, 2, 1, 0, -0.5, 1.5}, float[2] b = {0.1, -0.2}>
        {
            h = MatMul (x, w)
            z = Add (h, b)
            floor = Constant <value = float[1] {-1e30}> ()
            clipped = Max (z, floor)
            y = Softmax <axis = -1> (clipped)
        }
    """,
    # One two-head attention block with position ids as an input, as packing passes expect.
    "tiny_encoder": """
        <ir_version: 8, opset_import: ["" : 17]>
        tiny_encoder (int64[batch,seq] input_ids, int64[batch,seq] attention_mask, int64[batch,seq] position_ids)
            => (float[batch,seq,4] hidden)
            <float[8,4] word_table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                      16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
             float[8,4] position_table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                          16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
             float[4,4] wq = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1},
             float[4,4] wk = {0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0},
             float[4,4] wv = {1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1},
             int64[4] heads_shape = {0, 0, 2, 2}, int64[3] merged_shape = {0, 0, 4}, int64[2] mask_axes = {1, 2},
             float one = {1}, float masked = {-10000}, float scale = {0.70710677}>
        {
            words = Gather (word_table, input_ids)
            positions = Gather (position_table, position_ids)
            x = Add (words, positions)
            q = MatMul (x, wq)
            k = MatMul (x, wk)
            v = MatMul (x, wv)
            q_split = Reshape (q, heads_shape)
            k_split = Reshape (k, heads_shape)
            v_split = Reshape (v, heads_shape)
            q_heads = Transpose <perm = [0, 2, 1, 3]> (q_split)
            k_heads_t = Transpose <perm = [0, 2, 3, 1]> (k_split)
            v_heads = Transpose <perm = [0, 2, 1, 3]> (v_split)
            mask4 = Unsqueeze (attention_mask, mask_axes)
            mask_f = Cast <to = 1> (mask4)
            inverted = Sub (one, mask_f)
            mask_bias = Mul (inverted, masked)
            scores = MatMul (q_heads, k_heads_t)
            scaled = Mul (scores, scale)
            biased = Add (scaled, mask_bias)
            probs = Softmax <axis = -1> (biased)
            context = MatMul (probs, v_heads)
            context_t = Transpose <perm = [0, 2, 1, 3]> (context)
            merged = Reshape (context_t, merged_shape)
            hidden = Add (merged, x)
        }
    """,
    # What onnxruntime's transformer optimizer makes of a one-layer BERT: fused embeddings (their
    # mask_index, the row lengths, feeding the attention), attention with packed Q/K/V weights, skip
    # layer normalization with the dense bias, BiasGelu.
    "ort_fused_encoder": """
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        ort_fused_encoder (int64[batch,seq] input_ids, int64[batch,seq] attention_mask) => (float[batch,seq,4] hidden)
            <float[8,4] word_table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                      16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
             float[8,4] position_table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                          16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
             float[4] gamma = {1, 1, 1, 1}, float[4] beta = {0, 0, 0, 0}, float[4] dense_bias = {0.5, -0.5, 0.25, -0.25},
             float[4,12] qkv_weight = {1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0,
                                       0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0,
                                       0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 1,
                                       0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1},
             float[12] qkv_bias = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1}>
        {
            ids_int32 = Cast <to = 6> (input_ids)
            mask_int32 = Cast <to = 6> (attention_mask)
            embedded, mask_index = com.microsoft.EmbedLayerNormalization <epsilon = 1e-12> (ids_int32, "", word_table, position_table, "", gamma, beta, mask_int32)
            context = com.microsoft.Attention <num_heads = 2> (embedded, qkv_weight, qkv_bias, mask_index)
            normed = com.microsoft.SkipLayerNormalization <epsilon = 1e-12> (context, embedded, gamma, beta, dense_bias)
            hidden = com.microsoft.BiasGelu (normed, dense_bias)
        }
    """,
}

PACK = {"max_valid_num": 4, "segment_max_size": 8}


@dataclass(frozen=True)
class GoldenCase:
    pass_name: str
    model: str  # a key of MODELS
    options: dict[str, Any] = field(default_factory=dict)
    variant: str = ""  # names a second case of the same pass and model
    before: tuple[tuple[str, dict[str, Any]], ...] = ()  # passes (name, options) that prepare the model; the golden is the last pass's result

    @property
    def id(self) -> str:
        return f"{self.pass_name}__{self.model}" + (f"__{self.variant}" if self.variant else "")

    @property
    def path(self) -> Path:
        return EXPECTED / f"{self.id}.txt"


CASES = [
    GoldenCase("eliminate_identity", "identity_chain"),
    GoldenCase("eliminate_dead_code", "dead_branch"),
    GoldenCase("fold_constants", "constant_arithmetic"),
    GoldenCase("static_shape", "shape_arithmetic", {"input_shape": {"x": (2, 3)}}),
    GoldenCase("static_shape", "shape_arithmetic", {"input_shape": {"x": (2, 3)}, "dynamic_rows": True}, "dynamic_rows"),
    GoldenCase("export_position_ids", "embeddings"),
    GoldenCase("float_to_half", "small_mlp"),
    GoldenCase("quantize_int8", "small_mlp"),
    GoldenCase("pack_unpack_repack", "tiny_encoder", PACK),
    GoldenCase("attention_mask_packing", "tiny_encoder", PACK),
    GoldenCase("remove_outputs", "two_heads", {"outputs": ("end",)}),
    GoldenCase("add_checkpoints", "two_heads", {"tensors": ("trunk", "shifted")}),
    GoldenCase("token_stream_packing", "tiny_encoder", {**PACK, "max_tokens": 16}),
    GoldenCase("token_stream_loop_packing", "tiny_encoder", {**PACK, "max_tokens": 16}),
    GoldenCase("unfuse_ort", "ort_fused_encoder"),
    GoldenCase(
        "fuse_packed_attention", "tiny_encoder",
        before=(("attention_mask_packing", PACK), ("static_shape", {"input_shape": {"input_ids": (2, 8)}}), ("fold_constants", {})),
    ),
]

# Tensor types onnx.printer writes as readable numbers (float16 and co. come out as raw bits).
PRINTABLE = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.BOOL, onnx.TensorProto.STRING,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
}  # fmt: skip


def run_case(case: GoldenCase) -> onnx.ModelProto:
    model = onnx.parser.parse_model(MODELS[case.model])
    passes = [get_pass(name)(**options) for name, options in case.before]
    result, _ = PassManager([*passes, get_pass(case.pass_name)(**case.options)]).run(model)
    return result


def canonical_text(model: onnx.ModelProto, case: GoldenCase) -> str:
    canonical = onnx.ModelProto()
    canonical.CopyFrom(model)
    del canonical.graph.value_info[:]
    for node in canonical.graph.node:
        node.ClearField("name")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_readable(attr.t))
    for tensor in canonical.graph.initializer:
        tensor.CopyFrom(_readable(tensor))
    options = f" with {case.options}" if case.options else ""
    options += f" after {', '.join(name for name, _ in case.before)}" if case.before else ""
    header = f"# {case.pass_name}{options} on '{case.model}' (tests/golden/test_pass_goldens.py); refresh: {REFRESH}\n"
    return header + onnx.printer.to_text(canonical) + "\n"


def _readable(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor itself if it prints small and readable, else a string with its summary."""
    if tensor.data_type in PRINTABLE and math.prod(tensor.dims) <= PREVIEW_ELEMENTS:
        return tensor
    return onnx.helper.make_tensor(tensor.name, onnx.TensorProto.STRING, [], [str(tensor_summary(tensor)).encode()])


def golden_mismatch(expected: str, actual: str) -> str | None:
    """None when both texts describe the same graph; else the structural report and the text diff."""
    if expected == actual:
        return None
    report = diff_models(onnx.parser.parse_model(expected), onnx.parser.parse_model(actual), labels=("golden", "actual"))
    if report.equal:
        return None  # only names or node order differ
    text_diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "golden", "actual"))
    return f"{format_report(report)}\n\n{text_diff}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pass_matches_golden(case: GoldenCase, update_goldens: bool) -> None:
    actual = canonical_text(run_case(case), case)
    if update_goldens:
        case.path.write_text(actual)
        return
    if not case.path.exists():
        pytest.fail(f"no golden {case.path.name}; write it with `{REFRESH}` and review it")
    mismatch = golden_mismatch(case.path.read_text(), actual)
    if mismatch:
        pytest.fail(f"{case.id} differs from its golden (if intended: `{REFRESH}`)\n{mismatch}", pytrace=False)


def test_every_builtin_pass_has_a_golden() -> None:
    builtin = {cls.name for cls in list_passes() if cls.__module__.startswith("poprt_lite.")}
    missing = sorted(builtin - {case.pass_name for case in CASES})
    assert not missing, f"add a GoldenCase to tests/golden/test_pass_goldens.py for: {', '.join(missing)}"


def test_no_stale_goldens() -> None:
    stale = sorted({p.name for p in EXPECTED.glob("*.txt")} - {case.path.name for case in CASES})
    assert not stale, f"golden files without a case (delete them): {', '.join(stale)}"


def _float_to_half_golden() -> tuple[GoldenCase, str]:
    case = next(c for c in CASES if c.pass_name == "float_to_half")
    return case, case.path.read_text()


def test_a_regression_shows_the_structural_report_and_the_text_diff() -> None:
    case, golden = _float_to_half_golden()
    unconverted = canonical_text(onnx.parser.parse_model(MODELS[case.model]), case)  # as if the pass did nothing
    mismatch = golden_mismatch(golden, unconverted)
    assert mismatch is not None
    report, text_diff = mismatch.split("\n\n", 1)
    assert "  nodes: 7 -> 5: 2 removed (Cast 2); 1 changed (Constant 1)" in report.splitlines()
    assert "- node Cast to=10: (x) -> (x_fp16)" in report.splitlines()
    assert "-   x_fp16 = Cast <to: int = 10> (x)" in text_diff.splitlines()
    assert "+   h = MatMul (x, w)" in text_diff.splitlines()


def test_renamed_tensors_and_reordered_nodes_still_match() -> None:
    _, golden = _float_to_half_golden()
    cast, floor = "   x_fp16 = Cast <to: int = 10> (x)\n", "   floor = Constant"
    assert cast in golden and floor in golden
    # Move the Cast after the Constant and rename its output.
    renamed = golden.replace(cast, "").replace(floor, cast.replace("x_fp16", "x_half") + floor).replace("(x_fp16,", "(x_half,")
    assert renamed != golden
    assert golden_mismatch(golden, renamed) is None
