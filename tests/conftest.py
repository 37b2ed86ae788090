"""Shared fixtures: the bundled models and a way to run them per request."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from poprt_lite.compiler import verify

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = ROOT / "testdata"
QA_MODELS = ["bert_qa_torchscript", "bert_qa_dynamo", "roberta_qa", "distilbert_qa"]
ALL_MODELS = [*QA_MODELS, "bert_meanpool"]
VOCAB = 1000
# RoBERTa's padding id; other models pad with 0.
PAD_ID = {"roberta_qa": 1}
# Set by .ci/run, which installs every extra: a test skipped for a missing package
# (pytest.importorskip) fails instead, so that CI cannot pass without running it.
REQUIRE_EXTRAS = os.environ.get("POPRT_LITE_REQUIRE_EXTRAS") == "1"


def model_path(name: str) -> Path:
    return TESTDATA / f"{name}.onnx"


def docstring_ids(tree: ast.AST) -> set[int]:
    """The `id`s of the docstring constants in a parsed module (of the module, classes and functions)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def make_request(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    """One unpadded request: token ids avoid the special ids 0-2."""
    return verify.make_requests(rng, [length], VOCAB)[0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2023)


def _fail_skips_for_missing_packages(report) -> None:
    if not (REQUIRE_EXTRAS and report.skipped and isinstance(report.longrepr, tuple)):
        return
    reason = report.longrepr[2]
    if reason.startswith("Skipped: could not import") or reason.startswith("could not import"):
        report.outcome = "failed"
        report.longrepr = f"{reason}; POPRT_LITE_REQUIRE_EXTRAS=1 (.ci/run): install every extra of pyproject.toml"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skips_for_missing_packages(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips_for_missing_packages(outcome.get_result())
