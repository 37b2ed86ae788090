"""Export the benchmark models: a BERT encoder with a QA head and random weights, at a given geometry.

Same recipe as `testdata/make_models.py` (transformers config, eager attention, TorchScript
exporter, opset 17, biases and LayerNorm parameters randomised so every path contributes). Geometries:
`BERT_BASE` (12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522; ~420 MB), `MINILM`
(all-MiniLM-L6's: 6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522; ~90 MB) and
`TINY` (the `--small` preset's), and for `benchmarks/compile_time.py` `BERT_LARGE` (24 layers, hidden
1024, 16 heads; ~1.3 GB) and `BERT_2_5GB` (48 such layers; ~2.5 GB, over protobuf's limit, so saved
with its weights in `<name>.onnx.data`). Nothing is downloaded. The file goes to a cache directory (default
`~/.cache/poprt-lite/`), never to the repository; torch / transformers are imported only here
(`pip install '.[export]'`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from poprt_lite.errors import PoprtError, option
from poprt_lite.ir import default_cache_dir
from poprt_lite.vocab import INPUT_IDS, Role


@dataclass(frozen=True)
class Geometry:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    max_positions: int = 512

    @property
    def tag(self) -> str:
        return f"bert_qa_l{self.layers}_h{self.hidden}_a{self.heads}_i{self.intermediate}_v{self.vocab}"


BERT_BASE = Geometry()
MINILM = Geometry(layers=6, hidden=384, heads=12, intermediate=1536)
TINY = Geometry(layers=2, hidden=64, heads=4, intermediate=128, vocab=1000)
BERT_LARGE = Geometry(layers=24, hidden=1024, heads=16, intermediate=4096)  # ~1.3 GB
# ~2.5 GB of fp32 weights, over protobuf's 2 GB: saved with its weights in `<name>.onnx.data`.
BERT_2_5GB = Geometry(layers=48, hidden=1024, heads=16, intermediate=4096)


def export_bert_qa(path: str | os.PathLike, geometry: Geometry = BERT_BASE, seed: int = 0) -> Path:
    """Export a BertForQuestionAnswering with random weights to `path` (inputs input_ids,
    attention_mask, token_type_ids with dynamic batch/sequence; outputs start_logits, end_logits)."""
    try:
        import torch
        from transformers import BertConfig, BertForQuestionAnswering

        from poprt_lite.ir.torch_export import QAWithTypes, export_torchscript, randomise_
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PoprtError(
            f"exporting the benchmark model needs torch and transformers ({exc}); "
            f"pip install '.[export]' or pass {option('model')}"
        ) from None

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=geometry.vocab,
        hidden_size=geometry.hidden,
        num_hidden_layers=geometry.layers,
        num_attention_heads=geometry.heads,
        intermediate_size=geometry.intermediate,
        max_position_embeddings=geometry.max_positions,
        type_vocab_size=2,
        attn_implementation="eager",
    )
    model = BertForQuestionAnswering(config)
    randomise_(model)
    names = [INPUT_IDS, Role.attention_mask.value, Role.token_type_ids.value]
    outputs = ["start_logits", "end_logits"]
    example = (
        torch.randint(4, geometry.vocab, (2, 8)),
        torch.ones(2, 8, dtype=torch.int64),
        torch.zeros(2, 8, dtype=torch.int64),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch", 1: "sequence"} for n in names + outputs}
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
        # Over 2 GB the exporter writes one external data file per tensor beside the model: the
        # weights are then gathered into one `<name>.data` file (poprt-lite's own writer).
        tmp = Path(folder) / path.name
        export_torchscript(QAWithTypes(model.eval()).eval(), example, names, outputs, axes, tmp)
        del model
        if len(list(Path(folder).iterdir())) == 1:
            os.replace(tmp, path)
        else:
            from poprt_lite import ir

            ir.open_model(tmp).save(path)
    return path


def cached_bert_qa(cache_dir: str | os.PathLike | None = None, geometry: Geometry = BERT_BASE) -> Path:
    """The exported model in the cache directory, exporting it on first use."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{geometry.tag}.onnx"
    if not path.is_file():
        export_bert_qa(path, geometry)
    return path
