"""Proving which attention-mask terms are the padding mask alone (issue 21): by value, on the
exports of testdata/make_mask_models.py (a band, a causal mask, a constant table combined with the
padding mask) and the BERT-like exports whose only term is the padding mask."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import model_path
from patterns.test_attention import blocks_of
from poprt_lite import ir
from poprt_lite.patterns import mask_terms
from poprt_lite.patterns.attention import token_content

EXPORTERS = ("torchscript", "dynamo")
KIND_OF = {  # mask kind -> what `describe` says the combined term is made of
    "band_where": "a sliding-window band built from position differences",
    "band_mul": "a sliding-window band built from position differences",
    "causal": "a causal mask comparing positions",
    "table": "a constant table of per-position values ('table', [128, 128])",
}


def _analysed(name: str, longest: int = 16):
    graph, blocks = blocks_of(ir.load_model(model_path(name)), longest)
    inputs = {t.name: t for t in graph.inputs}
    return graph, blocks, inputs["attention_mask"], tuple(inputs["input_ids"].shape[:2]), token_content(graph, ["input_ids"])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", sorted(KIND_OF))
def test_a_term_combining_the_padding_mask_with_more_is_not_a_mask(kind, exporter):
    """Layer 0 masks padding only: proven, replaceable. Layer 1 combines the padding mask with a
    band, a causal mask or a table in one term (or one Where): never proven, so never dropped."""
    _, blocks, _, _, content = _analysed(f"mask_{kind}_{exporter}")
    assert len(blocks) == 2
    assert blocks[0].masked and not blocks[0].combined
    assert not blocks[1].masked
    ((node, tensor),) = blocks[1].combined
    assert node.op in ("Add", "Where")
    assert mask_terms.describe(tensor, content) == KIND_OF[kind]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_band_added_next_to_the_padding_mask_is_a_bias(exporter):
    """band_add adds the band and the padding mask as two summands: the mask is proven and
    replaceable, the band reads no mask and stays as a bias."""
    _, blocks, _, _, _ = _analysed(f"mask_band_add_{exporter}")
    assert blocks[1].masked and not blocks[1].combined
    assert len(blocks[1].biases) == 1


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_modernbert_global_layer_is_padding_only_and_local_layer_is_a_band(exporter):
    """transformers 5's mask functions gather the padding mask by index (Range over the flattened
    mask): still the padding mask alone, proven by value; the local layer's adds the window band."""
    _, blocks, _, _, content = _analysed(f"modernbert_window_{exporter}", longest=40)
    global_, local = blocks
    assert global_.masked and not global_.combined
    assert not local.masked
    ((_, tensor),) = local.combined
    assert mask_terms.describe(tensor, content) == "a sliding-window band built from position differences"


def test_a_window_wider_than_the_probe_is_the_padding_mask_there():
    """The proof is for the lengths the packed model serves: ModernBERT's 16-token window masks
    nothing in requests of up to 8 tokens, so there the local term is the padding mask alone."""
    _, blocks, _, _, _ = _analysed("modernbert_window_torchscript", longest=8)
    assert all(block.masked and not block.combined for block in blocks)


@pytest.mark.parametrize(("kind", "invariant"), [("band_where", True), ("band_mul", True), ("causal", True), ("table", False)])
def test_shift_invariance_by_value(kind, invariant):
    """A band or causal mask is the same for a request anywhere in a row; a table indexed by
    absolute position is not."""
    graph, blocks, mask, dims, content = _analysed(f"mask_{kind}_torchscript")
    ((_, tensor),) = blocks[1].combined
    assert mask_terms.shift_invariant(graph, tensor, mask, dims, 24, content) is invariant


def test_probe_lengths_cover_short_long_and_between():
    assert mask_terms.probe_lengths(40) == [1, 2, 3, 5, 8, 13, 20, 21, 34, 38, 39, 40]
    assert mask_terms.probe_lengths(1) == [1]


def test_evaluate_gives_the_exporters_mask_values():
    """The evaluated padding term of a BERT export: 0 on real keys, finfo.min on padding keys, for
    every query (transformers 5 expands it to [B, 1, S, S])."""
    graph, blocks, mask, dims, content = _analysed("bert_qa_torchscript")
    (term,) = blocks[0].terms
    masks = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int64)
    (value,) = mask_terms.evaluate(graph, term.masks, mask, masks, dims, content)
    assert value.shape == (2, 1, 4, 4)
    for query in range(4):
        assert np.array_equal(value[:, 0, query] == 0, masks == 1)
    assert value[0, 0, 0, 3] <= -1e30
