"""Torch modules as ONNX files: torch.onnx's two exporters as poprt-lite calls them, and the module
wrappers they export. Shared by the export of model folders (`apps/export.py`), the benchmark's
models (`bench/export.py`) and `testdata/make_models.py`, which import it when they export.

Importing this module imports torch (`pip install '.[export]'`); nothing else in poprt-lite does.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18


def randomise_(model: nn.Module, std: float = 0.1) -> None:
    """Give biases and LayerNorm affine parameters non-trivial random values, so that every bias
    path contributes to the output and numerical checks of rewritten graphs mean something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, std)
            elif "LayerNorm" in name or "layer_norm" in name.lower():  # BERT / DistilBERT spellings
                p.normal_(1.0, std)


class QAWithTypes(nn.Module):
    """A `*ForQuestionAnswering` model as (input_ids, attention_mask, token_type_ids) ->
    (start_logits, end_logits), the interface the exporter sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return out.start_logits, out.end_logits


class SentenceTransformerExport(nn.Module):
    """A whole `SentenceTransformer` (its modules in order, as its folder's modules.json says) as
    (its tokenizer's tensors, in `input_names` order) -> (token_embeddings, sentence_embedding):
    what people export."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.st = model
        self.input_names = list(input_names)

    def forward(self, *inputs):
        features = self.st(dict(zip(self.input_names, inputs, strict=True)))
        return features["token_embeddings"], features["sentence_embedding"]


def export_torchscript(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict,
    path: str | os.PathLike,
    opset: int = TORCHSCRIPT_OPSET,
) -> None:
    """The TorchScript exporter (`dynamo=False`), at opset 17 unless `opset` says otherwise, with constant folding."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )


def export_dynamo(
    module: nn.Module,
    example: Mapping[str, np.ndarray],
    input_names: list[str],
    output_names: list[str],
    path: str | os.PathLike,
    max_sequence: int | None = 512,
) -> None:
    """The dynamo exporter (`torch.export`) at opset 18, optimized, dynamic [batch, sequence] on
    every input (sequence 2 to `max_sequence` while tracing, None: the bounds torch.export finds;
    the file does not keep them), weights inline and doc strings (local paths, stack traces)
    dropped, so the file is the same on every machine."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=2, max=max_sequence) if max_sequence else torch.export.Dim.AUTO
    dynamic_shapes = tuple({0: batch, 1: seq} for _ in input_names)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic_shapes = (dynamic_shapes,)  # forward(*inputs): torch.export sees one argument, a tuple
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            tuple(torch.from_numpy(example[n]) for n in input_names),
            None,
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    proto = prog.model_proto
    # Make sure every initializer is inline (no external-data file).
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"initializer {t.name} still external")
    _strip_doc_strings(proto)
    onnx.save(proto, str(path), save_as_external_data=False)


def _strip_doc_strings(proto: onnx.ModelProto) -> None:
    def strip_graph(g: onnx.GraphProto) -> None:
        g.doc_string = ""
        for n in g.node:
            n.doc_string = ""
            del n.metadata_props[:]
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    strip_graph(a.g)
                for sg in a.graphs:
                    strip_graph(sg)

    proto.doc_string = ""
    strip_graph(proto.graph)
    for f in proto.functions:
        f.doc_string = ""
        for n in f.node:
            n.doc_string = ""
            del n.metadata_props[:]
