"""Sentence embeddings on a CPU: poprt-lite against the ways people run all-MiniLM-L6-v2, in one run.

The same texts (`--texts`, default 2400: `documentation_texts` of testdata/make_models.py, queries,
sentences and passages of CPython's documentation, 3 to ~1000 tokens, all truncated at the model's
256), the real all-MiniLM-L6-v2 (the slow tests' cache: ~/.cache/poprt-lite), every way in its own
process with `--threads` threads, its model loaded and warmed up first (load time reported apart),
then `--rounds` rounds, each way embedding every text once per round, the ways interleaved (the
order rotates every round). Tokenization is included everywhere. Ways:

- sentence-transformers, torch (`encode`, batch 32) and `backend="onnx"`: its own ONNX export,
  float32, and its int8 export (`export_dynamic_quantized_onnx_model(..., "avx512_vnni")`);
- fastembed (`TextEmbedding` on the folder with `specific_model_path`, mean pooling, normalized,
  batch 32; tokenizer_config.json's `max_length` 256 so it truncates where the others do);
- Infinity's Python engine (`AsyncEmbeddingEngine`, optimum, `pooling_method="mean"`, batch 32), on
  sentence-transformers' float32 export and on its int8 export (at the folder's top, the int8 one
  renamed `model_quantized.onnx`: its optimum engine picks a `*quantize*` file on a CPU; config.json's
  max_position_embeddings 256, the length it truncates at);
- onnxruntime on poprt-lite's own export of the model: float32 in batches of 32 sorted by length,
  and a plain `quantize_dynamic` copy of it the same way;
- poprt-lite: `Embedder` on the export packed in token_stream mode, float32 and `precision="int8"`.

The peers run in virtual environments of their own, which `--setup` creates under
~/.cache/poprt-lite/peers with pip (the pins that install together: see PEERS) and fills with the
exports each needs; a way whose environment is missing is left out, saying so. Reported: sentences/s
per round (median and range), the ratio of each way to every other (median of the per-round
ratios), and the cosine of every vector to sentence-transformers' float32 torch vector (min, mean).

Run from the repository root:
    python benchmarks/cpu_peers.py --setup               # once: the peers' venvs and exports
    python benchmarks/cpu_peers.py [--rounds 3] [--json docs/cpu-peers-2cpu.json --plot docs/cpu-peers-2cpu.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOME = Path.home() / ".cache" / "poprt-lite" / "peers"
# venv -> the pins that install together (torch from the local CPU wheel where it is one)
PEERS = {
    "sentence-transformers": ["torch==2.13.0+cpu", "sentence-transformers[onnx]>=5,<6", "transformers==4.57.6"],
    "fastembed": ["fastembed==0.9.1"],
    "infinity": ["torch==2.13.0+cpu", "infinity-emb[torch,optimum,server]==0.0.78", "transformers==4.48.3", "numpy<2", "pyarrow<20"],
}
# way -> (venv, None for this interpreter); the reference way comes first
WAYS = {
    "sentence-transformers torch": "sentence-transformers",
    "sentence-transformers onnx": "sentence-transformers",
    "sentence-transformers onnx int8": "sentence-transformers",
    "fastembed": "fastembed",
    "infinity optimum": "infinity",
    "infinity optimum int8": "infinity",
    "onnxruntime fp32 sorted batches of 32": None,
    "quantize_dynamic sorted batches of 32": None,
    "poprt-lite fp32 (token_stream)": None,
    "poprt-lite int8 (token_stream)": None,
}
REFERENCE = "sentence-transformers torch"
MAX_LENGTH = 256
BATCH = 32
ST_INT8 = "onnx/model_qint8_avx512_vnni.onnx"


# ------------------------------------------------------------------------------- the workers


def load_way(way: str, work: Path, threads: int):
    """The way's embed function (texts -> float32 [n, 384]), model loaded. Runs in the way's venv:
    only the standard library, numpy and the way's own packages are imported."""
    if way.startswith("sentence-transformers"):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        if way == "sentence-transformers torch":
            model = SentenceTransformer(str(work / "folder"), device="cpu")
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            kwargs = {"provider": "CPUExecutionProvider", "session_options": options}
            if way.endswith("int8"):
                kwargs["file_name"] = ST_INT8
            model = SentenceTransformer(str(work / "st-onnx"), device="cpu", backend="onnx", model_kwargs=kwargs)
        return lambda texts: model.encode(texts, batch_size=BATCH, convert_to_numpy=True)
    if way == "fastembed":
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        TextEmbedding.add_custom_model(
            model="local/all-MiniLM-L6-v2", pooling=PoolingType.MEAN, normalization=True,
            sources=ModelSource(hf="local/all-MiniLM-L6-v2"), dim=384, model_file="onnx/model.onnx",
        )
        model = TextEmbedding("local/all-MiniLM-L6-v2", specific_model_path=str(work / "fastembed"), threads=threads)
        return lambda texts: np.stack(list(model.embed(texts, batch_size=BATCH)))
    if way.startswith("infinity"):
        import asyncio

        folder = work / ("infinity-int8" if way.endswith("int8") else "infinity")
        # Infinity lists a local folder's files with the folder's path in front, which optimum then
        # cannot find inside the folder: run from the folder, as "."; and its optimized copy of the
        # model is cached by folder name, so each way gets a cache of its own.
        os.chdir(folder)
        os.environ["HF_HUB_CACHE"] = str(work / f"hf-cache-{folder.name}")
        from infinity_emb import AsyncEmbeddingEngine, EngineArgs

        engine = AsyncEmbeddingEngine.from_args(
            EngineArgs(model_name_or_path=".", engine="optimum", device="cpu", batch_size=BATCH, pooling_method="mean")
        )
        loop = asyncio.new_event_loop()
        loop.run_until_complete(engine.astart())

        def embed(texts):
            vectors, _ = loop.run_until_complete(engine.embed(sentences=texts))
            return np.asarray(vectors, np.float32)

        return embed
    return load_own_way(way, work, threads)


def load_own_way(way: str, work: Path, threads: int):
    """onnxruntime and poprt-lite, in this interpreter (poprt-lite from this checkout)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "testdata"))
    import make_models
    from embed_throughput import Original

    from poprt_lite.apps.embed import Embedder, load_tokenizer

    model, folder = make_models.cached_minilm(), make_models.minilm_folder()
    if way.startswith("poprt-lite"):
        embedder = Embedder.from_model(model, folder, threads=threads, precision="int8" if "int8" in way else "fp32")
        return embedder.embed
    tokenizer, _ = load_tokenizer(folder)
    original = Original(work / "quantize_dynamic.onnx" if way.startswith("quantize_dynamic") else model, tokenizer, threads)
    return lambda texts: original.sorted_batches(texts, BATCH)


def worker(way: str, work: Path, threads: int) -> int:
    """Load, warm up, then embed every text on each `run` line of stdin; one JSON line per step."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' prints go to stderr; stdout carries the protocol only
    texts = json.loads((work / "texts.json").read_text())
    start = time.perf_counter()
    embed = load_way(way, work, threads)
    loaded = time.perf_counter() - start
    embed(texts[:64])
    print(json.dumps({"load_seconds": loaded}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        vectors = embed(texts)
        seconds = time.perf_counter() - start
        np.save(work / f"{way}.npy", np.asarray(vectors, np.float32))
        print(json.dumps({"seconds": seconds}), file=out, flush=True)
    return 0


# ------------------------------------------------------------------------------- setup


def setup(work: Path) -> None:
    """Create the peers' venvs (pip) and the exports they read."""
    base = getattr(sys, "_base_executable", sys.executable)
    for venv, pins in PEERS.items():
        python = HOME / venv / "bin" / "python"
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(HOME / venv)], check=True)
            result = subprocess.run([str(python), "-m", "pip", "install", "-q", *pins])
            if result.returncode != 0:
                print(f"{venv}: pip install {' '.join(pins)} failed; its ways are left out")
                shutil.rmtree(HOME / venv)
    prepare(work)


def prepare(work: Path) -> None:
    """The folders and models the ways read, made once into `work`."""
    sys.path.insert(0, str(ROOT / "testdata"))
    import make_models

    folder = make_models.minilm_folder()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "folder").exists():
        shutil.copytree(folder, work / "folder")
    if not (work / "quantize_dynamic.onnx").exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(make_models.cached_minilm()), str(work / "quantize_dynamic.onnx"), weight_type=QuantType.QInt8)
    python = HOME / "sentence-transformers" / "bin" / "python"
    if python.exists() and not (work / "st-onnx" / ST_INT8).exists():
        shutil.copytree(folder, work / "st-onnx", dirs_exist_ok=True)
        script = (
            "import sys\nfrom sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model\n"
            "m = SentenceTransformer(sys.argv[1], device='cpu', backend='onnx')\nm.save_pretrained(sys.argv[1])\n"
            "export_dynamic_quantized_onnx_model(m, 'avx512_vnni', sys.argv[1])\n"
        )
        subprocess.run([str(python), "-c", script, str(work / "st-onnx")], check=True)
    exported = work / "st-onnx" / "onnx" / "model.onnx"
    if exported.exists():
        # fastembed reads onnx/model.onnx; Infinity's optimum engine finds only a model at the folder's top
        for name, onnx_file, target in (("fastembed", exported, "onnx/model.onnx"), ("infinity", exported, "model.onnx"),
                                        ("infinity-int8", work / "st-onnx" / ST_INT8, "model_quantized.onnx")):
            if (work / name).exists():
                continue
            shutil.copytree(folder, work / name)
            (work / name / target).parent.mkdir(exist_ok=True)
            shutil.copy(onnx_file, work / name / target)
            config = work / name / ("tokenizer_config.json" if name == "fastembed" else "config.json")
            values = json.loads(config.read_text())
            values["max_length" if name == "fastembed" else "max_position_embeddings"] = MAX_LENGTH
            config.write_text(json.dumps(values))


# ------------------------------------------------------------------------------- the run


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the peers' venvs and exports, then exit")
    parser.add_argument("--texts", type=int, default=2400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, of: " + ", ".join(WAYS))
    parser.add_argument("--work", type=Path, default=HOME / "work")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work, args.threads)
    if args.setup:
        setup(args.work)
        return 0
    prepare(args.work)
    sys.path.insert(0, str(ROOT / "testdata"))
    import make_models

    from poprt_lite.apps.embed import load_tokenizer

    texts = make_models.documentation_texts(args.texts, args.seed)
    (args.work / "texts.json").write_text(json.dumps(texts))
    tokenizer, _ = load_tokenizer(make_models.minilm_folder())
    tokenizer.no_truncation()
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine()}; {args.threads} threads per way; load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{len(texts)} texts, {lengths.min()}..{lengths.max()} tokens (mean {lengths.mean():.1f}, {int((lengths > MAX_LENGTH).sum())} over {MAX_LENGTH}, truncated)")

    workers, load = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    for way in args.ways.split(","):
        venv = WAYS[way]
        python = sys.executable if venv is None else str(HOME / venv / "bin" / "python")
        if not Path(python).exists():
            print(f"{way}: no venv {HOME / venv} (python benchmarks/cpu_peers.py --setup), left out")
            continue
        command = [python, str(Path(__file__).resolve()), "--worker", way, "--work", str(args.work), "--threads", str(args.threads)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                   cwd=str(ROOT))
        reply = process.stdout.readline()
        if not reply:
            print(f"{way}: failed to load (run it alone: {' '.join(command)}), left out")
            continue
        load[way] = json.loads(reply)["load_seconds"]
        workers[way] = process
    seconds = {way: [] for way in workers}
    order = list(workers)
    for round_ in range(args.rounds):
        for way in order[round_ % len(order):] + order[: round_ % len(order)]:
            workers[way].stdin.write("run\n")
            workers[way].stdin.flush()
            seconds[way].append(json.loads(workers[way].stdout.readline())["seconds"])
    for process in workers.values():
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # Infinity's engine threads keep its worker alive after its stdin closes
            process.kill()
    load_after = os.getloadavg()

    reference = np.load(args.work / f"{REFERENCE}.npy") if REFERENCE in workers else None
    rows = {}
    for way in workers:
        rates = len(texts) / np.asarray(seconds[way])
        cosine = None
        if reference is not None:
            got = np.load(args.work / f"{way}.npy")
            values = np.sum(got * reference, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
            cosine = (float(values.min()), float(values.mean()))
        rows[way] = {"sentences_per_second": rates.tolist(), "load_seconds": load[way], "cosine_min_mean": cosine}
    ratio = {a: {b: float(np.median(np.asarray(seconds[b]) / np.asarray(seconds[a]))) for b in workers} for a in workers}

    print(f"load average after: {', '.join(f'{x:.1f}' for x in load_after)}\n")
    print(f"| way | sentences/s (min-max) | load s | min / mean cosine to {REFERENCE} |")
    print("|---|---:|---:|---|")
    for way, row in rows.items():
        rates = row["sentences_per_second"]
        cosine = row["cosine_min_mean"]
        cos = f"{cosine[0]:.4f} / {cosine[1]:.4f}" if cosine else "-"
        print(f"| {way} | {np.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | {row['load_seconds']:.1f} | {cos} |")
    print("\nratio of the row's sentences/s to the column's (median of the per-round ratios):\n")
    names = list(workers)
    print("| | " + " | ".join(f"x {i + 1}" for i in range(len(names))) + " |")
    print("|---|" + "---:|" * len(names))
    for i, a in enumerate(names):
        print(f"| {i + 1}. {a} | " + " | ".join(f"{ratio[a][b]:.2f}" for b in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "machine": machine(), "threads": args.threads, "texts": len(texts),
                                         "load_average_after": load_after, "results": rows, "ratios": ratio}, indent=2))
    if args.plot:
        plot(rows, args.plot, f"all-MiniLM-L6-v2, {len(texts)} texts, {args.threads} threads, {machine()}")
    return 0


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    rates = [np.median(rows[n]["sentences_per_second"]) for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    bars = ax.barh(names[::-1], rates[::-1], color=["#c44" if n.startswith("poprt-lite") else "#888" for n in names[::-1]])
    for bar, name in zip(bars, names[::-1], strict=True):
        cosine = rows[name]["cosine_min_mean"]
        label = f"{bar.get_width():.0f}/s" + (f"  min cos {cosine[0]:.3f}" if cosine else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.set_xlabel("sentences/s (tokenization included)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(rates) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
