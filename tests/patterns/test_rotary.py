"""Rotary position embeddings found by structure (issue 24): the position row ModernBERT's Cos / Sin
angles are computed from, and RoFormer's lookup of sin / cos rows from a table, in both exporters'
forms; models with a position table have none."""

from __future__ import annotations

import pytest

from conftest import model_path
from poprt_lite import ir
from poprt_lite.patterns.attention import token_content
from poprt_lite.patterns.rotary import find_rotary_positions, unsqueeze_axes


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
    assert rotary.broadcast == [] and rotary.pinned == []


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_roformer_rows_are_looked_up_from_its_sinusoidal_table_by_range(exporter):
    """One Gather from the [512, 16] table by Range(0, seq), put before the heads as [1, 1, seq, 16]
    (TorchScript: two Unsqueezes, dynamo: one of axes [0, 1], whose [1, 1, -1, 16] Reshapes of the
    interleaved sin and cos pin the batch to 1)."""
    rotary = _rotary(f"roformer_{exporter}")
    assert rotary is not None
    (lookup,) = rotary.angles
    assert rotary.readers == [lookup] and lookup.op == "Gather" and lookup.inputs[0].name == "model.encoder.embed_positions.weight"
    assert rotary.positions is lookup.inputs[1] and rotary.positions.inputs[0].op == "Range"
    (chain,) = rotary.broadcast
    assert [unsqueeze_axes(n) for n in chain] == ([[0], [1]] if exporter == "torchscript" else [[0, 1]])
    assert [n.inputs[1].values.tolist() for n in rotary.pinned] == ([] if exporter == "torchscript" else [[1, 1, -1, 16]] * 2)


@pytest.mark.parametrize("name", ["bert_qa_torchscript", "mpnet_qa", "deberta_v2_qa", "modernbert_window_torchscript"])
def test_no_rotary_row_where_positions_are_a_table_or_an_input(name):
    """BERT adds a position table; DeBERTa has relative positions only; the ModernBERT export with a
    position_ids input computes its angles from that input, not from a Range."""
    assert _rotary(name) is None
