"""Pooled (per-request) outputs reach the right request through the PackRunner, also when first_fit
places a later request into an earlier row (request slots follow the order of first tokens)."""

from __future__ import annotations

import numpy as np
import onnx

from conftest import VOCAB, model_path
from poprt_lite import compile
from poprt_lite.compiler import verify
from poprt_lite.ir.artifact import converted_fields, in_memory
from poprt_lite.compiler import CompileOptions
from poprt_lite.runtime import PackAlgorithm, PackRunner, PackRunnerConfig

NAME = "st_mean_norm_torchscript"


def test_pack_runner_first_fit_out_of_order_rows():
    shape = {n: (3, 16) for n in ("input_ids", "attention_mask", "token_type_ids")}
    options = CompileOptions(input_shape=shape, pack_args={"mode": "attention_mask", "max_valid_num": "6", "segment_max_size": "16"})
    model = compile(model_path(NAME), save=False, options=options).model
    art = in_memory(model_path(NAME), model, converted_fields(model, b""))
    requests = verify.make_requests(np.random.default_rng(11), [10, 12, 5, 16], VOCAB)
    config = PackRunnerConfig(timeout_microseconds=2_000_000)
    config.algorithm = PackAlgorithm.first_fit
    runner = PackRunner(art, config)
    try:
        futures = [runner.execute_async({k: v[0] for k, v in r.items() if k != "attention_mask"}) for r in requests]
    finally:
        runner.close()  # runs the open batch at once: all four in one batch, request 2 in row 0
    assert runner.stats.batches == 1 and runner.stats.requests == 4
    original = verify.session(onnx.load(model_path(NAME)))
    for request, future in zip(requests, futures, strict=True):
        tokens, pooled = original.run(None, request)
        got = future.result()
        np.testing.assert_allclose(got["sentence_embedding"], pooled[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["token_embeddings"], tokens[0], atol=1e-4, rtol=0)
