"""The pass manager: runs an ordered pipeline and keeps the model valid between passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from poprt_lite import ir, ops
from poprt_lite.errors import PassError, PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult


@dataclass
class PassRecord:
    """One line of the pipeline report."""

    name: str
    seconds: float
    changed: bool
    message: str


class PassManager:
    """Runs passes in order. Whatever a pass leaves in the graph is kept, whether or not it reports
    `changed` (see `PassResult`). After every pass the graph is cleaned up and topologically sorted,
    custom-op function bodies are attached, and the model is checked with `onnx.checker` and strict
    shape inference; a pass that raises or leaves an invalid model stops the pipeline with a
    `PassError` naming it.

    `dump_after` names passes (or `"all"`) whose output model is written to `dump_dir` as
    `NN_<pass>.onnx`, so a user can see what each pass did.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        dump_after: Iterable[str] = (),
        dump_dir: str | Path | None = None,
        on_pass_done: Callable[[PassRecord], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.dump_after = set(dump_after)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.on_pass_done = on_pass_done
        if self.dump_after and self.dump_dir is None:
            raise PoprtError("--dump_after needs a folder to write to; give --output_dir")
        names = {p.name for p in self.passes}
        unknown = self.dump_after - names - {"all"}
        if unknown:
            raise PoprtError(
                f"--dump_after names {', '.join(sorted(unknown))}, which is not in the pipeline ({', '.join(p.name for p in self.passes)})"
            )

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        ctx = ctx if ctx is not None else PassContext(metadata=ir.get_metadata(model))
        ir.check_graph(model, "the input model")
        source = onnx.ModelProto()
        source.CopyFrom(model)
        records = []
        for index, pass_ in enumerate(self.passes):
            start = time.perf_counter()
            graph = ir.to_graph(model)
            try:
                result = pass_.run(graph, ctx)
            except PoprtError as exc:
                raise PassError(f"pass '{pass_.name}' failed: {exc}") from exc
            except Exception as exc:
                raise PassError(f"pass '{pass_.name}' crashed: {type(exc).__name__}: {exc}") from exc
            check_result(pass_, result)
            # The graph is kept whatever `changed` says: it reports, it does not decide (see PassResult).
            graph.cleanup().toposort()
            model = ir.to_model(graph, template=model)
            for key, value in ctx.metadata.items():
                ir.set_metadata(model, key, value)
            try:
                model = validate(model, f"pass '{pass_.name}' left an invalid model")
            except PassError:
                if index == 0:  # nothing validated the model before: blame the input if it is invalid
                    validate(source, "the input model is invalid (no pass has run on it)")
                raise
            record = PassRecord(pass_.name, time.perf_counter() - start, result.changed, result.message)
            records.append(record)
            if self.on_pass_done is not None:
                self.on_pass_done(record)
            if "all" in self.dump_after or pass_.name in self.dump_after:
                ir.save_model(model, self.dump_dir / f"{index:02d}_{pass_.name}.onnx")
        return model, records


def check_result(pass_: Pass, result: object) -> None:
    """A pass's `run` must return a PassResult (a function pass may return a bool)."""
    if not isinstance(result, PassResult):
        raise PassError(f"pass '{pass_.name}' returned {type(result).__name__}; run() must return a PassResult")


def validate(model: onnx.ModelProto, what: str = "invalid model") -> onnx.ModelProto:
    """Attach custom-op bodies, check the model and infer shapes afresh (stale value_info dropped)."""
    ops.attach_functions(model)
    del model.graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = " ".join(str(exc).split())
        raise PassError(f"{what}: {first[:400]}") from exc
