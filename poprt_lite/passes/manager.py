"""The pass manager: runs an ordered pipeline and keeps the model valid between passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from poprt_lite import ir, ops
from poprt_lite.errors import PassError, PoprtError, option
from poprt_lite.passes.base import Pass, PassContext, PassResult


@dataclass
class PassRecord:
    """One line of the pipeline report."""

    name: str
    seconds: float  # wall time of the pass and of the checks after it
    changed: bool
    message: str
    cpu_seconds: float = 0.0  # CPU time of this process over the same span


class PassManager:
    """Runs passes in order on one graph (`ir.Model`), which every pass edits in place. Whatever a
    pass leaves in the graph is kept, whether or not it reports `changed` (see `PassResult`). After
    every pass the graph is cleaned up and topologically sorted, and its structure (custom-op
    function bodies attached, large weights declared rather than copied) is checked with
    `onnx.checker` and strict shape inference, whose types the graph then takes; a pass that raises
    or leaves an invalid model stops the pipeline with a `PassError` naming it.

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
            raise PoprtError(f"{option('dump_after')} needs a folder to write to; give {option('output_dir')}")
        names = {p.name for p in self.passes}
        unknown = self.dump_after - names - {"all"}
        if unknown:
            raise PoprtError(
                f"{option('dump_after')} names {', '.join(sorted(unknown))}, which is not in the pipeline ({', '.join(p.name for p in self.passes)})"
            )

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """Convert a ModelProto in memory: the returned model is a new ModelProto with the weights."""
        ir.check_graph(model, "the input model", onnxruntime_ops=any(p.accepts_onnxruntime_ops for p in self.passes))
        working = ir.Model.from_proto(model)
        records = self.run_model(working, ctx)
        return working.to_proto(), records

    def run_model(self, model: ir.Model, ctx: PassContext | None = None) -> list[PassRecord]:
        """Run the pipeline on `model`'s graph, in place: one graph from the first pass to the last."""
        ctx = ctx if ctx is not None else PassContext(metadata=model.metadata())
        source = model.structure()  # checked only to blame the input if the first pass leaves an invalid model
        records = []
        checked = None
        for index, pass_ in enumerate(self.passes):
            start, cpu_start = time.perf_counter(), time.process_time()
            if checked is not None:
                model.adopt_functions(checked)  # the custom-op bodies attached for the check stay
            try:
                result = pass_.run(model.graph, ctx)
            except PoprtError as exc:
                raise PassError(f"pass '{pass_.name}' failed: {exc}") from exc
            except Exception as exc:
                raise PassError(f"pass '{pass_.name}' crashed: {type(exc).__name__}: {exc}") from exc
            check_result(pass_, result)
            # The graph is kept whatever `changed` says: it reports, it does not decide (see PassResult).
            model.graph.cleanup().toposort()
            for key, value in ctx.metadata.items():
                model.set_metadata(key, value)
            try:
                checked = validate(model.structure(), f"pass '{pass_.name}' left an invalid model")
                ir.apply_types(model.graph, checked)
            except PassError:
                if index == 0:  # nothing validated the model before: blame the input if it is invalid
                    validate(source, "the input model is invalid (no pass has run on it)")
                raise
            record = PassRecord(
                pass_.name, time.perf_counter() - start, result.changed, result.message, time.process_time() - cpu_start
            )
            records.append(record)
            if self.on_pass_done is not None:
                self.on_pass_done(record)
            if "all" in self.dump_after or pass_.name in self.dump_after:
                model.save(self.dump_dir / f"{index:02d}_{pass_.name}.onnx")
        return records


def check_result(pass_: Pass, result: object) -> None:
    """A pass's `run` must return a PassResult (a function pass may return a bool)."""
    if not isinstance(result, PassResult):
        raise PassError(f"pass '{pass_.name}' returned {type(result).__name__}; run() must return a PassResult")


def validate(model: onnx.ModelProto, what: str = "invalid model") -> onnx.ModelProto:
    """Attach custom-op bodies, check the model and infer shapes afresh (stale value_info dropped);
    returns the model with the inferred types."""
    ops.attach_functions(model)
    del model.graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = " ".join(str(exc).split())
        raise PassError(f"{what}: {first[:400]}") from exc
