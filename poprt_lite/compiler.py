"""`poprt_lite.compile`: PopRT's conversion, from options to a converted model and an artifact."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from poprt_lite import artifact, ir, passes, vocab
from poprt_lite.errors import PoprtError
from poprt_lite.passes import Pass, PassManager, PassRecord
from poprt_lite.vocab import MetaKey, PackMode

PACK_PASSES = {PackMode.unpack_repack: "pack_unpack_repack", PackMode.attention_mask: "attention_mask_packing"}
REQUIRED_PACK_KEYS = ("max_valid_num", "segment_max_size")


@dataclass
class CompileOptions:
    """Everything the CLI's conversion flags say, parsed."""

    precision: str = "fp32"
    input_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pack_args: dict[str, str] = field(default_factory=dict)
    export_position_ids: bool = False
    passes: Sequence[str] | None = None  # an explicit pipeline instead of the default one
    pass_options: dict[str, dict[str, str]] = field(default_factory=dict)
    fp16_io: bool = False
    fp16_skip_op_types: Sequence[str] = ()
    dump_after: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise PoprtError(f"--precision must be fp32 or fp16, got '{self.precision}'")
        if self.pack_args:
            parse_pack_args(self.pack_args)


@dataclass
class CompileResult:
    model: onnx.ModelProto
    records: list[PassRecord]
    output_model: Path | None = None
    artifact: Path | None = None


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
            raise PoprtError(f"bad --input_shape '{item}': expected NAME=D0,D1,... with positive integers, e.g. input_ids=16,256")
        if name in shapes:
            raise PoprtError(f"--input_shape gives '{name}' twice")
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


def parse_pack_args(pack_args: dict[str, str]) -> dict[str, int | str]:
    """Validate `--pack_args` (max_valid_num, segment_max_size, optional mode)."""
    known = (*REQUIRED_PACK_KEYS, "mode")
    unknown = sorted(set(pack_args) - set(known))
    if unknown:
        raise PoprtError(f"unknown --pack_args key '{unknown[0]}'; known keys: {', '.join(known)}")
    missing = [k for k in REQUIRED_PACK_KEYS if k not in pack_args]
    if missing:
        raise PoprtError(f"--pack_args needs {missing[0]}=N (e.g. --pack_args max_valid_num=40 segment_max_size=256)")
    mode = pack_args.get("mode", vocab.DEFAULT_PACK_MODE)
    if mode not in PACK_PASSES:
        raise PoprtError(f"--pack_args mode must be one of {', '.join(PACK_PASSES)}, got '{mode}'")
    parsed: dict[str, int | str] = {"mode": PackMode(mode)}
    for key in REQUIRED_PACK_KEYS:
        try:
            parsed[key] = int(pack_args[key])
        except ValueError:
            raise PoprtError(f"--pack_args {key} must be a positive integer, got '{pack_args[key]}'") from None
        if parsed[key] <= 0:
            raise PoprtError(f"--pack_args {key} must be a positive integer, got {parsed[key]}")
    return parsed


def build_pipeline(options: CompileOptions) -> list[Pass]:
    """The passes to run, each configured from the options that concern it."""
    names = list(options.passes) if options.passes is not None else default_pipeline(options)
    configured = {
        "static_shape": {"input_shape": options.input_shape},
        "float_to_half": {"fp16_io": options.fp16_io, "skip_op_types": tuple(options.fp16_skip_op_types)},
    }
    if options.pack_args:
        pack = parse_pack_args(options.pack_args)
        for pass_name in PACK_PASSES.values():
            configured[pass_name] = {k: pack[k] for k in REQUIRED_PACK_KEYS}
    unknown_targets = set(options.pass_options) - set(names)
    if unknown_targets:
        raise PoprtError(f"--pass_option names pass '{sorted(unknown_targets)[0]}', which is not in the pipeline")
    pipeline = []
    for name in names:
        cls = passes.get_pass(name)
        if name in options.pass_options:
            pipeline.append(cls.from_strings(options.pass_options[name]))
        else:
            pipeline.append(cls(**configured.get(name, {})))
    return pipeline


def default_pipeline(options: CompileOptions) -> list[str]:
    names = ["eliminate_identity"]
    if options.export_position_ids or options.pack_args:
        names.append("export_position_ids")
    if options.pack_args:
        names.append(PACK_PASSES[parse_pack_args(options.pack_args)["mode"]])
    if options.input_shape:
        names.append("static_shape")
    names += ["fold_constants", "eliminate_dead_code"]
    if options.precision == "fp16":
        names.append("float_to_half")
    return names


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
    """Convert `input_model`; write the model (and with `export_popef`, `output_dir/executable.popef`)."""
    options = options or CompileOptions()
    source = ir.load_model(input_model)
    source_sha = artifact.sha256(Path(input_model).read_bytes())
    pipeline = build_pipeline(options)
    dump_dir = Path(output_dir) if output_dir is not None else None
    manager = PassManager(pipeline, dump_after=options.dump_after, dump_dir=dump_dir, on_pass_done=on_pass_done)
    model, records = manager.run(source)
    ir.set_metadata(model, MetaKey.precision, options.precision)
    result = CompileResult(model=model, records=records)
    if not save:
        return result
    if export_popef and model.ByteSize() > ir.PROTOBUF_LIMIT:
        raise PoprtError("the converted model is over 2 GB, which an artifact cannot hold; drop --export_popef and use the .onnx with its .data file")
    result.output_model = ir.save_model(model, output_model or default_output_path(input_model, output_dir))
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
            {"source_sha256": source_sha, MetaKey.precision.value: options.precision, "pipeline": pipeline_info},
        )
    return result


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))
