"""Torch-side pieces shared by the benchmark export and `testdata/make_models.py`.

Importing this module imports torch (`pip install '.[export]'`); nothing else in poprt-lite does.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

TORCHSCRIPT_OPSET = 17


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
