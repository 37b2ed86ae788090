"""Regenerate the tiny encoders whose attention masks carry more than the padding mask.

Running ``python testdata/make_mask_models.py`` writes, next to this script, for each mask kind
below a TorchScript export (``mask_<kind>_torchscript.onnx``, opset 17) and a dynamo export
(``mask_<kind>_dynamo.onnx``, opset 18), plus two ModernBERT exports:

* ``band_add`` - layer 1 adds a sliding-window band (0 within ``WINDOW`` positions, min outside,
  from ``|j - i|``) to the scores next to the additive padding mask (two summands);
* ``band_where`` - layer 1 masks ``masked_fill(~(padding & band), min)``: one Where whose condition
  combines the padding mask and the band with And;
* ``band_mul`` - layer 1's additive mask is ``(1 - padding * band) * min``: the padding mask and the
  band multiplied into one term;
* ``causal`` - layer 1 masks ``masked_fill(~(padding & (j <= i)), min)``: padding and causal;
* ``table`` - layer 1 adds ``where(padding, table[:S, :S], min)``: the padding mask mixed with a
  constant table of per-(i, j) values (learned, sliced to the sequence length); not the same for a
  request later in a packed row, so attention_mask packing must refuse it.

Layer 0 of each is a plain encoder layer under the additive padding mask. Every model takes
``position_ids`` (a learned position table) and returns the token states and their masked mean.

* ``modernbert_window_torchscript.onnx`` / ``modernbert_window_dynamo.onnx`` - transformers'
  ModernBertModel (rotary positions; layer 0 global, layer 1 local with a window of 16 tokens, shorter
  than the test sequences), exported with a ``position_ids`` input, plus mean pooling: the model of
  the silent wrong answer packing once gave.
* ``modernbert_rotary_torchscript.onnx`` / ``modernbert_rotary_dynamo.onnx`` - the same model exported
  as people do, without a ``position_ids`` input: the rotary angles are computed from
  ``arange(seq)`` inside the graph.

Tiny (hidden 32 or 64, vocab 1000), random weights after ``torch.manual_seed(0)``. After each export
the script compares onnxruntime with PyTorch on a padded batch (< 1e-4). Needs ``pip install
'.[export]'``; the tests use the committed files.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN, HEADS, POSITIONS, WINDOW = 1000, 32, 2, 128, 4
KINDS = ("band_add", "band_where", "band_mul", "causal", "table")
NAMES = dict(input_names=["input_ids", "attention_mask", "position_ids"], output_names=["last_hidden_state", "pooled"])
MIN = torch.finfo(torch.float32).min


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.ffn = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))
        self.norm2 = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor, additive: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5
        if additive is not None:
            scores = scores + additive
        if keep is not None:
            scores = scores.masked_fill(~keep, MIN)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, HIDDEN)
        x = self.norm(x + self.out(context))
        return self.norm2(x + self.ffn(x))


class MaskedEncoder(nn.Module):
    """Two layers: layer 0 under the padding mask, layer 1 under the padding mask and `kind`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.words = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(POSITIONS, HIDDEN)
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.table = nn.Parameter(torch.randn(POSITIONS, POSITIONS))

    def forward(self, input_ids, attention_mask, position_ids):
        x = self.words(input_ids) + self.positions(position_ids)
        seq = input_ids.shape[1]
        padding = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        additive = (1.0 - attention_mask[:, None, None, :].float()) * MIN
        x = self.layers[0](x, additive, None)
        pos = torch.arange(seq, device=input_ids.device)
        band = ((pos[None, :] - pos[:, None]).abs() <= WINDOW)[None, None]  # [1, 1, S, S]
        if self.kind == "band_add":
            x = self.layers[1](x, additive + torch.where(band, 0.0, MIN), None)
        elif self.kind == "band_where":
            x = self.layers[1](x, None, padding & band)
        elif self.kind == "band_mul":
            x = self.layers[1](x, (1.0 - attention_mask[:, None, None, :].float() * band.float()) * MIN, None)
        elif self.kind == "causal":
            x = self.layers[1](x, None, padding & (pos[None, :] <= pos[:, None])[None, None])
        else:
            x = self.layers[1](x, torch.where(padding, self.table[:seq, :seq], MIN), None)
        weights = attention_mask[:, :, None].float()
        return x, (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class ModernBertMean(nn.Module):
    """ModernBertModel + mean pooling; `forward(input_ids, attention_mask[, position_ids])`."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ModernBertConfig, ModernBertModel

        config = ModernBertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=16, pad_token_id=0,
            cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        config._attn_implementation = "eager"
        self.model = ModernBertModel(config).eval()

    def forward(self, input_ids, attention_mask, position_ids=None):
        x = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        weights = attention_mask[:, :, None].float()
        return x, (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def example(lengths=(40, 25), seq: int = 40) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (len(lengths), seq), generator=generator)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    positions = torch.arange(seq)[None].expand(len(lengths), seq).contiguous()
    return ids, mask, positions


def export(module: nn.Module, path: Path, dynamo: bool, inputs: int = 3) -> None:
    """Export with the first `inputs` of (input_ids, attention_mask, position_ids)."""
    args = example()[:inputs]
    names = dict(NAMES, input_names=NAMES["input_names"][:inputs])
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=POSITIONS)
        shapes = {name: {0: batch, 1: seq} for name in names["input_names"]}
        program = torch.onnx.export(module, args, dynamo=True, opset_version=18, dynamic_shapes=shapes, **names)
        program.save(str(path), external_data=False)
    else:
        axes = {name: {0: "batch", 1: "seq"} for name in names["input_names"]}
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
    check(module, path, inputs)


def check(module: nn.Module, path: Path, inputs: int) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for lengths, seq in (((40, 25), 40), ((7, 30, 12), 30)):
        args = example(lengths, seq)[:inputs]
        with torch.no_grad():
            want = module(*args)
        got = session.run(None, dict(zip(NAMES["input_names"], (a.numpy() for a in args))))
        for name, w, g in zip(NAMES["output_names"], want, got, strict=True):
            diff = np.abs(w.numpy() - g)
            if name == "last_hidden_state":  # padded tokens' states are not the model's answer
                diff = diff * args[1].numpy()[:, :, None]
            assert diff.max() < 1e-4, f"{path.name}: {name} differs from torch by {diff.max():.3g}"
    size = path.stat().st_size
    assert size < 1_000_000, f"{path.name} is {size} bytes"
    print(f"{path.name}: {size} bytes, onnxruntime == torch")


def main() -> int:
    warnings.filterwarnings("ignore")
    for kind in KINDS:
        torch.manual_seed(0)
        module = MaskedEncoder(kind).eval()
        for dynamo in (False, True):
            export(module, HERE / f"mask_{kind}_{'dynamo' if dynamo else 'torchscript'}.onnx", dynamo)
    torch.manual_seed(0)
    modernbert = ModernBertMean().eval()
    for dynamo in (False, True):
        exporter = "dynamo" if dynamo else "torchscript"
        export(modernbert, HERE / f"modernbert_window_{exporter}.onnx", dynamo)
        export(modernbert, HERE / f"modernbert_rotary_{exporter}.onnx", dynamo, inputs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
