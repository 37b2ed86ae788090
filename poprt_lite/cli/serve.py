"""`poprt-lite serve MODEL [--tokenizer DIR] [--host H] [--port P] ...`: the HTTP service
(`poprt_lite.apps.serve`; `pip install 'poprt-lite[serve]'`).

MODEL is an artifact, a packed .onnx, or an exported ONNX model packed at start (--pack_args,
token_stream by default, as `poprt-lite embed`). The limits are text-embeddings-inference's flags;
`--batcher dynamic|single` serves the original model the way TEI's CPU backend does, or one request
at a time (the benchmark's baselines). `--ray auto|ADDRESS|local` serves the same app on Ray Serve,
`--replicas N` replicas (or `--autoscaling_config`) of `--threads` threads each (default 1)
(`poprt_lite.apps.ray.serve`, `pip install 'poprt-lite[ray]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from poprt_lite.cli import options
from poprt_lite.errors import PoprtError


def serve_command(
    model: Annotated[Path, typer.Argument(help="An artifact, a packed .onnx or an exported ONNX model.", show_default=False, metavar="MODEL")],
    tokenizer: options.TokenizerOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    pack_args: options.PackArgsOption = None,
    input_shape: options.InputShapeOption = None,
    precision: options.PrecisionOption = None,
    threads: options.ThreadsOption = 0,
    output_name: options.OutputNameOption = None,
    max_length: options.MaxLengthOption = None,
    model_id: Annotated[Optional[str], typer.Option("--model_id", help="The model's name in responses and /v2 routes (default: MODEL's file stem).")] = None,
    max_concurrent_requests: Annotated[int, typer.Option("--max_concurrent_requests", help="Inputs in flight beyond which calls get 429.")] = 512,
    max_client_batch_size: Annotated[int, typer.Option("--max_client_batch_size", help="Most inputs in one call (more: 422).")] = 2048,
    payload_limit: Annotated[int, typer.Option("--payload_limit", help="Largest request body, bytes (more: 413).")] = 2_000_000,
    api_key: Annotated[Optional[str], typer.Option("--api_key", envvar="POPRT_LITE_API_KEY", help="Require 'Authorization: Bearer KEY' (401 without).")] = None,
    auto_truncate: Annotated[bool, typer.Option("--auto_truncate", help="Truncate over-long inputs when a call does not say (TEI's default: refuse them, 422).")] = False,
    timeout_microseconds: Annotated[int, typer.Option("--timeout_microseconds", help="How long the PackRunner waits for a batch to fill (0: TEI's no wait timer, a batch runs as soon as the model is free).")] = 0,
    batcher: Annotated[str, typer.Option("--batcher", help="packing (the artifact's PackRunner), dynamic (the original model, TEI's padded batches) or single (the original model, one request at a time).")] = "packing",
    max_batch_requests: Annotated[int, typer.Option("--max_batch_requests", help="--batcher dynamic: most requests per padded batch.")] = 8,
    max_batch_tokens: Annotated[int, typer.Option("--max_batch_tokens", help="--batcher dynamic: most token slots (requests x longest) per padded batch.")] = 16384,
    graceful_shutdown_s: Annotated[float, typer.Option("--graceful_shutdown_s", help="On SIGTERM/SIGINT, how long calls in flight may take to finish.")] = 10.0,
    ray: options.RayOption = None,
    replicas: Annotated[Optional[int], typer.Option("--replicas", help="With --ray: replicas of the server, each with its own PackRunner of --threads threads (default 1).", show_default=False)] = None,
    autoscaling_config: Annotated[
        Optional[str],
        typer.Option("--autoscaling_config", help='With --ray, instead of --replicas: Ray Serve\'s autoscaling as JSON, e.g. \'{"min_replicas": 1, "max_replicas": 4}\'.', show_default=False),
    ] = None,
) -> None:
    try:
        from poprt_lite.apps.serve import Engine, Limits
        from poprt_lite.apps.serve.engine import check_batcher
        from poprt_lite.apps.serve.launcher import serve
    except ImportError as exc:
        raise PoprtError(f"serving needs the serve extra ({exc.name} is missing): pip install 'poprt-lite[serve]'") from None
    from poprt_lite.runtime import PackRunnerConfig

    for name, value in (("--max_concurrent_requests", max_concurrent_requests), ("--max_client_batch_size", max_client_batch_size),
                        ("--payload_limit", payload_limit), ("--max_batch_requests", max_batch_requests), ("--max_batch_tokens", max_batch_tokens)):
        if value < 1:
            raise PoprtError(f"{name} must be >= 1, got {value}")
    if threads < 0 or graceful_shutdown_s < 0:
        raise PoprtError(f"--threads and --graceful_shutdown_s must be >= 0, got {threads} and {graceful_shutdown_s}")
    check_batcher(batcher)
    if not model.exists():
        raise PoprtError(f"model '{model}' does not exist; pass an artifact, an .onnx file or a model folder")
    packing = options.packing(pack_args, input_shape, precision)
    config = PackRunnerConfig(timeout_microseconds=timeout_microseconds)

    def open_engine() -> Engine:
        return Engine.open(
            model, tokenizer, threads=threads, config=config, batcher=batcher, max_batch_requests=max_batch_requests,
            max_batch_tokens=max_batch_tokens, max_length=max_length, output=output_name, model_id=model_id, **packing,
        )

    limits = Limits(max_concurrent_requests, max_client_batch_size, payload_limit, api_key, auto_truncate)
    if ray is None:
        if replicas is not None or autoscaling_config is not None:
            raise PoprtError(f"{'--replicas' if replicas is not None else '--autoscaling_config'} applies with --ray; pass --ray auto|ADDRESS|local")
        serve(open_engine, limits, host=host, port=port, graceful_shutdown_s=graceful_shutdown_s,
              log_level="info" if options.current().verbose else "warning")
        return
    _serve_on_ray(ray, model, tokenizer, packing, output_name, max_length, model_id, config, limits, threads, batcher,
                  replicas, autoscaling_config, host, port, graceful_shutdown_s)


def _serve_on_ray(address, model, tokenizer, packing, output_name, max_length, model_id, config, limits, threads, batcher,
                  replicas, autoscaling_config, host, port, graceful_shutdown_s) -> None:
    """`poprt_lite.apps.ray.serve`: the same app on Ray Serve replicas."""
    import json

    if batcher != "packing":
        raise PoprtError(f"--batcher {batcher} runs in one process; on Ray each replica runs the artifact's PackRunner")
    if replicas is not None and autoscaling_config is not None:
        raise PoprtError("--replicas and --autoscaling_config exclude each other; pass one")
    if replicas is not None and replicas < 1:
        raise PoprtError(f"--replicas must be >= 1, got {replicas}")
    scaling = None
    if autoscaling_config is not None:
        try:
            scaling = json.loads(autoscaling_config)
        except ValueError as exc:
            raise PoprtError(f"--autoscaling_config is not JSON ({exc}); pass e.g. '{{\"min_replicas\": 1, \"max_replicas\": 4}}'") from None
        if not isinstance(scaling, dict) or not scaling:
            raise PoprtError("--autoscaling_config must be a JSON object of Ray Serve's autoscaling fields, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    from poprt_lite.apps.ray.cluster import connected, import_ray

    import_ray()
    from poprt_lite.apps.ray.serve import ShippedServer, run

    with connected(address, verbose=options.current().verbose):
        shipped = ShippedServer.of(model, tokenizer, max_length=max_length, output=output_name, model_id=model_id, **packing)
        shipped.engine(config, threads=1).close()  # a model that cannot be served is refused here, in one line
        run(shipped, limits, config, threads=threads or 1, replicas=replicas or 1, autoscaling_config=scaling,
            host=host, port=port, graceful_shutdown_s=graceful_shutdown_s)
