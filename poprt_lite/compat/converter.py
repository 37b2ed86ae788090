"""PopRT's Python conversion API: `poprt_lite.Converter(...).convert(model)`.

`Converter` takes `poprt.Converter`'s keywords with PopRT's defaults (PopRT 1.5 user guide, "Python
API") and converts an `onnx.ModelProto` in memory with the pipeline `poprt_lite.compile` would run
for the same CLI flags. Keywords for IPU-only settings are accepted with a notice when set to
anything but PopRT's default, unsupported ones are refused, as the CLI does (compat/poprt_options.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from poprt_lite import compiler, ir
from poprt_lite.compat import poprt_options
from poprt_lite.compiler import verify
from poprt_lite.errors import PoprtError
from poprt_lite.passes import PassManager
from poprt_lite.vocab import MetaKey

log = logging.getLogger(__name__)

# Keyword -> PopRT flag name where they differ.
FLAG_OF = {"disable_progress_bar": "disable_compilation_progress_bar"}
# PopRT's defaults of the keywords poprt-lite ignores or refuses (a notice only when one is changed).
IGNORED_DEFAULTS: dict[str, Any] = {
    "convert_version": 11, "eightbitsio": False, "disable_fast_norm": False, "fp8_skip_op_names": None,
    "fp8_params": "F143,F143,0,0", "quantize": False, "enable_insert_remap": False, "enable_erf_gelu": False,
    "serialize_matmul": None, "serialize_matmul_add": None, "merge_matmul": None, "merge_matmul_add": None, "merge_moe": None,
    "remap_mode": ["after_matmul"], "infer_shape_ahead": False, "enable_avoid_overflow_patterns": False,
    "disable_progress_bar": False, "batch_size": None, "batch_axis": None, "fold_periodic_initializer": False,
    "enable_compress_pattern": False, "merge_if_with_same_cond": False, "apply_hcsr": None,
}


class Converter:
    """Convert an ONNX model for packed inference on onnxruntime (PopRT's `poprt.Converter`)."""

    def __init__(
        self,
        *,
        input_shape: Mapping[str, Sequence[int]] | None = None,
        precision: str = "fp32",
        fp16_skip_op_types: str | Sequence[str] | None = None,
        skip_passes: str | Sequence[str] | None = None,
        used_passes: Sequence[str] = (),
        check: bool = False,
        pack_args: Mapping[str, Any] | None = None,
        max_tensor_size: int = -1,
        remove_outputs: Sequence[str] = (),
        checkpoints: str | Sequence[str] | None = None,
        logger: logging.Logger | None = None,
        **ipu_settings: Any,
    ) -> None:
        unknown = sorted(set(ipu_settings) - set(IGNORED_DEFAULTS))
        if unknown:
            raise TypeError(f"Converter() got an unexpected keyword argument '{unknown[0]}'")
        if ipu_settings.pop("quantize", False):
            raise PoprtError(f"quantize is not supported: {poprt_options.FP8}")
        changed = {
            FLAG_OF.get(key, key): value for key, value in ipu_settings.items() if value != IGNORED_DEFAULTS[key]
        }
        spelled = {flag: key for key, flag in FLAG_OF.items()}
        poprt_options.apply(changed, lambda flag: spelled.get(flag.name, flag.name))
        if precision in ("fp8", "fp8_weight"):
            raise PoprtError(f"precision {precision} is not supported: {poprt_options.FP8}")
        self.options = compiler.CompileOptions(
            precision=precision,
            input_shape={name: tuple(int(d) for d in dims) for name, dims in (input_shape or {}).items()},
            pack_args={key: _pack_value(value) for key, value in (pack_args or {}).items()},
            passes=_names(used_passes),
            skip_passes=_names(skip_passes),
            fp16_skip_op_types=_names(fp16_skip_op_types),
            remove_outputs=_names(remove_outputs),
            checkpoints=_names(checkpoints),
            max_tensor_size=max_tensor_size,
        )
        self.check = check
        self.logger = logger or log

    def convert(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The converted model (`model` itself is left as it was)."""
        source = onnx.ModelProto()
        source.CopyFrom(model)
        converted, records = PassManager(compiler.build_pipeline(self.options)).run(source)
        ir.set_metadata(converted, MetaKey.precision, self.options.precision)
        for record in records:
            self.logger.info("pass %s: %.1f ms, %s", record.name, record.seconds * 1000, record.message)
        if self.check:
            unmatched = verify.unmatched_output(model, converted, self.options.remove_outputs, self.options.checkpoints)
            if unmatched is not None:
                self.logger.warning("check: %s", unmatched)
            for name, diff in verify.max_abs_diff(model, converted).items():
                self.logger.warning("check: %s max abs diff %.3g", name, diff)
        return converted


def _names(value: str | Sequence[str] | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def _pack_value(value: Any) -> str:
    """PopRT's pack_args values (ints, `segment_max_size=[256]`, `dynamic_groups=[["input_ids"]]`) as CLI text."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return "+".join(str(v) for v in value)
    return str(value)
