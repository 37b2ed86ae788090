"""Pooling heads, L2 normalizations and echoed inputs, found by structure (poprt_lite/patterns/pooling.py)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import model_path
from poprt_lite import ir
from poprt_lite.patterns.layout import token_dims
from poprt_lite.patterns.pooling import PoolKind, find_echoes, find_l2_normalizations, find_pooling_heads


def graph_of(name: str) -> gs.Graph:
    graph = ir.to_graph(ir.load_model(model_path(name)))
    ir.infer_shapes_in_place(graph)
    return graph


def heads_of(name: str) -> list[tuple]:
    graph = graph_of(name)
    mask = next(t for t in graph.inputs if t.name == "attention_mask")
    heads = find_pooling_heads(graph, mask, token_dims(graph, "input_ids"))
    return sorted((h.kind.value, h.hidden.name, h.output.name, h.keepdims, h.masked, h.nodes[0].op) for h in heads)


@pytest.mark.parametrize(
    "name, heads",
    [
        ("st_mean_norm_torchscript", [("mean", "token_embeddings", "/pooling/Div_output_0", False, True, "Div")]),
        ("st_mean_norm_dynamo", [("mean", "token_embeddings", "div", False, True, "Div")]),
        # the first real token: GatherElements(ArgMax(mask)), then TorchScript's If squeeze idiom
        ("st_cls_norm_torchscript", [("first", "token_embeddings", "/pooling/If_output_0", False, True, "GatherElements")]),
        ("st_max_torchscript", [("max", "token_embeddings", "/pooling/ReduceMax_output_0", False, True, "ReduceMax")]),
        ("st_card_mean_echo", [("mean", "token_embeddings", "/Div_output_0", False, True, "Div")]),
        ("bert_meanpool", [("mean", "last_hidden_state", "pooled", False, True, "Div")]),
        # sum / Sqrt(Clip(count))
        ("st_mean_sqrt_len_torchscript", [("mean_sqrt_len", "token_embeddings", "/pooling/Div_output_0", False, True, "Div")]),
        # the mask times Range(1, seq + 1) - ArgMax(mask), in numerator and count
        ("st_weightedmean_torchscript", [("weighted_mean", "token_embeddings", "/pooling/Div_output_0", False, True, "Div")]),
        # GatherElements(h * mask, seq - ArgMax(flipped mask) - 1), then the If squeeze idiom
        ("st_lasttoken_torchscript", [("last", "token_embeddings", "/pooling/If_output_0", False, True, "GatherElements")]),
        (  # four modes concatenated; mean and mean_sqrt_len share their masked sum and count
            "st_multi_pool_dynamo",
            [
                ("last", "token_embeddings", "squeeze", False, True, "GatherElements"),
                ("mean", "token_embeddings", "div", False, True, "Div"),
                ("mean_sqrt_len", "token_embeddings", "div_1", False, True, "Div"),
                ("weighted_mean", "token_embeddings", "div_2", False, True, "Div"),
            ],
        ),
        (
            "pooling_variants",
            [
                ("first", "token_embeddings", "/Gather_output_0", False, False, "Gather"),
                ("first", "token_embeddings", "cls_slice", True, False, "Slice"),
                ("max", "token_embeddings", "max_where", False, True, "ReduceMax"),
                ("mean", "token_embeddings", "mean_reducemean", False, True, "Div"),  # not its mask's ReduceMean
                ("mean", "token_embeddings", "mean_unmasked", False, False, "ReduceMean"),
            ],
        ),
        ("bert_qa_torchscript", []),
    ],
)
def test_heads(name, heads):
    assert heads_of(name) == heads


def test_max_pooling_through_the_expanded_mask_and_its_nodes():
    graph = graph_of("st_max_torchscript")
    mask = next(t for t in graph.inputs if t.name == "attention_mask")
    (head,) = find_pooling_heads(graph, mask, token_dims(graph, "input_ids"))
    assert head.kind is PoolKind.max and [n.op for n in head.nodes] == ["ReduceMax", "Where"]
    # Without the mask input known, the same ReduceMax is an unmasked max over the filled tokens:
    # for an unpadded request (nothing filled) that is the same value
    (plain,) = find_pooling_heads(graph, None, token_dims(graph, "input_ids"))
    assert (plain.kind, plain.masked, plain.hidden.name, plain.output) == (PoolKind.max, False, "/pooling/Where_output_0", head.output)


@pytest.mark.parametrize(
    "name, norms",
    [
        ("st_mean_norm_torchscript", [("/pooling/Concat_output_0", "sentence_embedding", "Expand")]),  # F.normalize
        ("st_mean_norm_dynamo", [("div", "sentence_embedding", "Expand")]),
        ("pooling_variants", [("/Gather_output_0", "cls_gather_sqrt_norm", None)]),  # x / sqrt(sum(x*x))
        ("st_max_torchscript", []),
    ],
)
def test_l2_normalizations(name, norms):
    found = find_l2_normalizations(graph_of(name))
    assert [(n.input.name, n.output.name, n.expand.op if n.expand else None) for n in found] == norms


def test_echoes():
    assert [(o.name, i.name) for o, i in find_echoes(graph_of("st_card_mean_echo"))] == [
        ("input_ids_out", "input_ids"), ("attention_mask_out", "attention_mask"), ("token_type_ids_out", "token_type_ids"),
    ]
    assert find_echoes(graph_of("bert_meanpool")) == []


def _heads_after(name: str, edit) -> list[str]:
    graph = graph_of(name)
    edit(graph)
    mask = next(t for t in graph.inputs if t.name == "attention_mask")
    return sorted(h.kind.value for h in find_pooling_heads(graph, mask, token_dims(graph, "input_ids")))


def _replace_input(graph: gs.Graph, op: str, index: int, value) -> None:
    (node,) = [n for n in graph.nodes if n.op == op and n.name.startswith("/pooling/")]
    node.inputs[index] = gs.Constant(f"edited_{op}_{index}", np.array(value))


def test_weights_must_be_the_positions_from_one():
    assert _heads_after("st_weightedmean_torchscript", lambda g: None) == ["weighted_mean"]
    # Range(0, ...): token i weighs i - 1, not sentence-transformers' weightedmean
    assert _heads_after("st_weightedmean_torchscript", lambda g: _replace_input(g, "Range", 0, np.float32(0))) == []


def test_last_token_index_must_come_from_the_reversed_mask():
    assert _heads_after("st_lasttoken_torchscript", lambda g: None) == ["last"]
    # the mask read forwards (step 1): ArgMax is the first real token, seq - it - 1 the last position, padding or not
    assert _heads_after("st_lasttoken_torchscript", lambda g: _replace_input(g, "Slice", 4, np.array([1]))) == []
