"""Shared fixtures: the bundled models and a way to run them per request."""

from __future__ import annotations

import ast
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
