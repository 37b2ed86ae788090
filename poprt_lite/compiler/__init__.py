"""`poprt_lite.compile`: PopRT's conversion, from options to a converted model and an artifact."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from poprt_lite import ir, passes, vocab
from poprt_lite.ir import artifact
from poprt_lite.compiler import pack_args, servable
from poprt_lite.errors import PoprtError, option
from poprt_lite.passes import Pass, PassManager, PassRecord
from poprt_lite.passes.registry import canonical_name
from poprt_lite.runtime import modes
from poprt_lite.vocab import MetaKey

# The last stage: the pass converting the model to the precision asked for (none for fp32).
PRECISION_PASSES = {"fp16": "float_to_half", "int8": "quantize_int8"}
PRECISIONS = ("fp32", *PRECISION_PASSES)
log = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    """Everything the CLI's conversion flags say, parsed (PopRT's names where PopRT has the option)."""

    precision: str = "fp32"
    input_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pack_args: dict[str, str] = field(default_factory=dict)
    export_position_ids: bool = False
    passes: Sequence[str] = ()  # PopRT's meaning: passes added to the default pipeline (PopRT or poprt-lite names)
    skip_passes: Sequence[str] = ()  # passes left out of the default pipeline
    pipeline: Sequence[str] | None = None  # exactly these passes, in this order, instead of the default pipeline
    pass_options: dict[str, dict[str, str]] = field(default_factory=dict)
    fp16_io: bool = False
    fp16_skip_op_types: Sequence[str] = ()
    dump_after: Sequence[str] = ()
    remove_outputs: Sequence[str] = ()
    checkpoints: Sequence[str] = ()  # intermediate tensors to add to the outputs (not with packing)
    max_tensor_size: int = -1  # bytes: constant folding leaves larger results computed at run time (-1: its default)
    dynamic_rows: bool = False  # --input_shape's first dim stays dynamic, up to its value (runtimes without static shapes)
    _pack: pack_args.PackArgs | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PoprtError(f"{option('precision')} must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got '{self.precision}'")
        if self.pipeline is not None and (self.passes or self.skip_passes):
            raise PoprtError("pipeline gives every pass to run; add or leave out passes in it instead of passes / skip_passes")
        if self.max_tensor_size < -1:
            raise PoprtError(f"max_tensor_size must be -1 (no limit of its own) or a size in bytes, got {self.max_tensor_size}")
        self.precision = _precision_named(self.precision, self.passes)
        mode = _packing_mode(self.pipeline if self.pipeline is not None else self.passes)
        if self.pack_args or mode is not None:
            self._pack = pack_args.parse(self.pack_args, self.input_shape, mode)
        if self.checkpoints and self._pack is not None:
            raise PoprtError(
                "checkpoints: intermediate tensors of a packed model could not be split per request; convert without packing to compare them"
            )
        if self.dynamic_rows and not self.input_shape:
            raise PoprtError(f"{option('dynamic_rows')} keeps the first dim of {option('input_shape')} dynamic; give {option('input_shape')}")
        if self.pipeline is None:
            default_pipeline(self, notify=True)  # unknown names are errors now, notices printed once

    @property
    def pack(self) -> pack_args.PackArgs | None:
        """The packing these options ask for (from pack_args and a packing pass in passes), or None."""
        return self._pack


@dataclass
class CompileResult:
    converted: ir.Model  # the converted graph, its weights where they were loaded
    records: list[PassRecord]
    output_model: Path | None = None
    artifact: Path | None = None

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        """The converted model as one ModelProto, weights included (built on first use: a copy of
        the weights in memory; `output_model` is the file)."""
        return self.converted.to_proto()


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`["input_ids=16,256", ...]` -> `{"input_ids": (16, 256)}`."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            values = tuple(int(d) for d in dims.split(","))
        except ValueError:
            values = ()
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise PoprtError(f"bad {option('input_shape')} '{item}': expected NAME=D0,D1,... with positive integers, e.g. input_ids=16,256")
        if name in shapes:
            raise PoprtError(f"{option('input_shape')} gives '{name}' twice")
        shapes[name] = values
    return shapes


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise PoprtError(f"bad {flag} '{item}': expected KEY=VALUE")
        pairs[key] = value
    return pairs


def build_pipeline(options: CompileOptions) -> list[Pass]:
    """The passes to run, each configured from the options that concern it."""
    names = [canonical_name(n) for n in options.pipeline] if options.pipeline is not None else default_pipeline(options)
    configured: dict[str, dict] = {
        "static_shape": {"input_shape": options.input_shape, "dynamic_rows": options.dynamic_rows},
        "float_to_half": {"fp16_io": options.fp16_io, "skip_op_types": tuple(options.fp16_skip_op_types)},
        "remove_outputs": {"outputs": tuple(options.remove_outputs)},
        "add_checkpoints": {"tensors": tuple(options.checkpoints)},
    }
    if options.max_tensor_size >= 0:
        configured["fold_constants"] = {"size_threshold_mb": options.max_tensor_size >> 20}
    if options.pack is not None:
        configured[modes.get(options.pack.mode).pass_name] = {**options.pack.values, "input_name": options.pack.input_name, "mode": options.pack.mode}
    if options.pipeline is not None:
        _check_pipeline(names, options)
    pass_options = {canonical_name(name): values for name, values in options.pass_options.items()}
    unknown_targets = set(pass_options) - set(names)
    if unknown_targets:
        raise PoprtError(f"{option('pass_options')} names pass '{sorted(unknown_targets)[0]}', which is not in the pipeline")
    pipeline = []
    for name in names:
        cls = passes.get_pass(name)
        if name in pass_options:
            pipeline.append(cls.from_strings(pass_options[name]))
        else:
            pipeline.append(cls(**configured.get(name, {})))
    return pipeline


def default_pipeline(options: CompileOptions, notify: bool = False) -> list[str]:
    """The default pipeline: the stages the options ask for, the extra `passes`, then the precision pass.

    PopRT's order rules: a pass named in `passes` that is a stage of the default pipeline (under its
    PopRT or poprt-lite name) switches that stage on at its place (a packing pass packs in its mode);
    any other pass runs after the stages, in the order given, before the precision pass (so it sees
    the float32 model with static shapes, and whatever it adds is converted too). `skip_passes` then
    leaves passes out (with `notify`, a name not in the pipeline gets a notice).
    """
    pack = options.pack
    extra = [canonical_name(n) for n in options.passes]
    stages = _stages()
    wanted = {
        "unfuse_ort": options.export_position_ids or pack is not None,  # a no-op on models without onnxruntime's fused ops
        "add_checkpoints": bool(options.checkpoints),
        "eliminate_identity": True,
        "remove_outputs": bool(options.remove_outputs),
        "export_position_ids": options.export_position_ids or pack is not None,
        "static_shape": bool(options.input_shape),
        "fold_constants": True,
        "eliminate_dead_code": True,
    }
    if pack is not None:
        wanted[modes.get(pack.mode).pass_name] = True
    names = [name for name in stages if wanted.get(name) or name in extra]
    names += [name for name in extra if name not in stages and name not in PRECISION_PASSES.values()]
    if options.precision in PRECISION_PASSES:
        names.append(PRECISION_PASSES[options.precision])
    for name in options.skip_passes:
        canonical = passes.get_pass(name).name  # an unknown name is an error, as in passes
        if canonical in names:
            names = [n for n in names if n != canonical]
        elif notify:
            log.warning("%s %s: not in the pipeline (%s), nothing to skip", option("skip_passes"), name, ", ".join(names))
    return names


def _check_pipeline(names: Sequence[str], options: CompileOptions) -> None:
    """An explicit pipeline must hold the passes the other options need, or they would be ignored."""
    needs = {
        "static_shape": "input_shape" if options.input_shape else None,
        "remove_outputs": "remove_outputs" if options.remove_outputs else None,
        "export_position_ids": "export_position_ids" if options.export_position_ids else None,
    }
    if options.precision in PRECISION_PASSES:
        needs[PRECISION_PASSES[options.precision]] = f"precision {options.precision}"
    if options.pack is not None:
        needs[modes.get(options.pack.mode).pass_name] = "pack_args"
    for name, needed_by in needs.items():
        if needed_by and name not in names:
            raise PoprtError(
                f"the pipeline ({', '.join(names)}) has no {name}, which {needed_by} needs: add {name} to it, or drop "
                f"{needed_by} (or give no pipeline: the default one runs what the options ask for)"
            )


def _stages() -> tuple[str, ...]:
    """The default pipeline, in order; a stage runs when the options ask for it (see default_pipeline).
    Passes named by `passes` that are not stages run after the last of these, before the precision pass.
    unfuse_ort comes first: onnxruntime's ops of the ONNX domain would fail the checks after any pass."""
    packing = dict.fromkeys(mode.pass_name for mode in modes.registered())
    return ("unfuse_ort", "add_checkpoints", "eliminate_identity", "remove_outputs", "export_position_ids", *packing,
            "static_shape", "fold_constants", "eliminate_dead_code")


def _precision_named(precision: str, passes: Sequence[str]) -> str:
    """PopRT: `passes` naming float_to_half converts to float16 like precision fp16 (and
    quantize_int8 to int8 like precision int8)."""
    named = [p for p, pass_name in PRECISION_PASSES.items() if pass_name in map(canonical_name, passes)]
    if not named:
        return precision
    if len(named) > 1 or precision not in ("fp32", named[0]):
        given = [f"precision {precision}"] if precision != "fp32" else []
        given += [f"passes {PRECISION_PASSES[p]}" for p in named]
        raise PoprtError(f"{' and '.join(given)} ask for different precisions; a model has one: give one of them")
    return named[0]


def _packing_mode(names: Sequence[str]) -> str | None:
    """The mode of the packing pass among `names` (PopRT: a packing pass in --passes packs in its mode)."""
    given = set(map(canonical_name, names))
    named = [name for name in dict.fromkeys(mode.pass_name for mode in modes.registered()) if name in given]
    if len(named) > 1:
        raise PoprtError(f"the passes name {len(named)} packing passes ({', '.join(named)}); a model packs in one mode")
    return modes.of_pass(named[0]).name if named else None


def default_output_path(input_model: str | os.PathLike, output_dir: str | os.PathLike | None) -> Path:
    source = Path(input_model)
    folder = Path(output_dir) if output_dir is not None else source.parent
    return folder / f"{source.stem}.poprt-lite.onnx"


def compile(
    input_model: str | os.PathLike,
    output_model: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    export_popef: bool = False,
    options: CompileOptions | None = None,
    on_pass_done: Callable[[PassRecord], None] | None = None,
    save: bool = True,
) -> CompileResult:
    """Convert `input_model`; write the model (and with `export_popef`, `output_dir/executable.popef`).

    A packed model that no runner could serve is refused before anything is written
    (`servable.check_servable`)."""
    options = options or CompileOptions()
    pipeline = build_pipeline(options)
    model = ir.open_model(input_model, onnxruntime_ops=any(p.accepts_onnxruntime_ops for p in pipeline))
    dump_dir = Path(output_dir) if output_dir is not None else None
    manager = PassManager(pipeline, dump_after=options.dump_after, dump_dir=dump_dir, on_pass_done=on_pass_done)
    records = manager.run_model(model)
    model.set_metadata(MetaKey.precision, options.precision)
    if vocab.pack_spec_of(model.metadata()) is not None:  # describing the model costs a copy of its graph
        servable.check_servable(artifact.described_form(model), options.precision, input_model)
    result = CompileResult(converted=model, records=records)
    if not save:
        return result
    result.output_model = model.save(output_model or default_output_path(input_model, output_dir))
    if export_popef:
        pipeline_info = [
            {
                "name": r.name,
                "options": _jsonable(vars(p.options)),
                "seconds": round(r.seconds, 4),
                "changed": r.changed,
                "message": r.message,
            }
            for p, r in zip(pipeline, records)
        ]
        result.artifact = artifact.write_artifact(
            Path(output_dir or ".") / artifact.DEFAULT_NAME,
            model,
            {"source_sha256": artifact.sha256_file(input_model), MetaKey.precision.value: options.precision, "pipeline": pipeline_info},
        )
    return result


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))


class CompilerOptions:
    """PopRT's `poprt.compiler.CompilerOptions`. Its fields configure the IPU compiler (batches per
    step, IPUs, I/O tiles, ...): poprt-lite takes any of them and uses none (a notice names them)."""

    def __init__(self, **fields: object) -> None:
        vars(self).update(fields)


class Compiler:
    """PopRT's `poprt.compiler.Compiler`: a converted model to an executable, poprt-lite's artifact
    (the model with its manifest), in memory or exported to a file (`executable.popef`)."""

    @staticmethod
    def compile(model: str | os.PathLike | onnx.ModelProto, outputs: Sequence[str] | None = None, options: CompilerOptions | None = None) -> artifact.Artifact:
        source, path = _compiler_input(model, outputs, options)
        return artifact.in_memory(path, source, artifact.converted_fields(source, _source_bytes(model)))

    @staticmethod
    def compile_and_export(
        model: str | os.PathLike | onnx.ModelProto, outputs: Sequence[str] | None, filename: str | os.PathLike, options: CompilerOptions | None = None
    ) -> None:
        source, _ = _compiler_input(model, outputs, options)
        servable.export_artifact(filename, source, artifact.converted_fields(source, _source_bytes(model)))


def _compiler_input(model, outputs, options) -> tuple[onnx.ModelProto, Path]:
    if options is not None and vars(options):
        log.warning("CompilerOptions %s do not apply, ignored: they configure the IPU compiler", ", ".join(sorted(vars(options))))
    if isinstance(model, onnx.ModelProto):
        source, path = model, Path("<ModelProto>")
    else:
        source, path = ir.load_model(model), Path(model)
    present = [o.name for o in source.graph.output]
    if outputs is not None and list(outputs) != present:
        missing = [name for name in outputs if name not in present]
        if missing:
            raise PoprtError(f"outputs names '{missing[0]}', which is not a model output; outputs are: {', '.join(present)}")
        source = passes.get_pass("remove_outputs")(outputs=tuple(name for name in present if name not in outputs))(source)
    return source, path


def _source_bytes(model) -> bytes:
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
