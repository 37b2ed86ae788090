"""Rotary position embeddings found by structure (issue 24): the position row ModernBERT's Cos / Sin
angles are computed from, in both exporters' forms; models with a position table have none."""

from __future__ import annotations

import pytest

from conftest import model_path
from poprt_lite import ir
from poprt_lite.patterns.attention import token_content
from poprt_lite.patterns.rotary import find_rotary_positions


def _rotary(name: str):
    graph = ir.to_graph(ir.load_model(model_path(name)))
    ir.infer_shapes_in_place(graph)
    return find_rotary_positions(graph, token_content(graph, ["input_ids"]))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_modernbert_angles_come_from_one_position_row(exporter):
    rotary = _rotary(f"modernbert_rotary_{exporter}")
    assert rotary is not None
    assert rotary.positions.inputs[0].op == "Unsqueeze" and rotary.positions.inputs[0].inputs[0].inputs[0].op == "Range"
    assert sorted(n.op for n in rotary.angles) == ["Cos", "Cos", "Sin", "Sin"]  # global and local rotary
    assert rotary.readers and all(any(t is rotary.positions for t in n.inputs) for n in rotary.readers)


@pytest.mark.parametrize("name", ["bert_qa_torchscript", "mpnet_qa", "deberta_v2_qa", "modernbert_window_torchscript"])
def test_no_rotary_row_where_positions_are_a_table_or_an_input(name):
    """BERT adds a position table; DeBERTa has relative positions only; the ModernBERT export with a
    position_ids input computes its angles from that input, not from a Range."""
    assert _rotary(name) is None
