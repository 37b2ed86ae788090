"""`--config_yaml FILE`: PopRT's flags as a YAML mapping, merged under the command line's.

Keys are flag names without dashes (`input_model: bert.onnx`, `input_shape: [input_ids=16,256]`,
`export_popef: true`), as in PopRT's YAML files; a mapping value means KEY=VALUE items
(`input_shape: {input_ids: [16, 256]}`, `pack_args: {max_valid_num: 40}`). A flag given on the command line overrides the
file. PopRT flags that poprt-lite ignores get their notice, refused ones their error; `model_fusion`
(several models fused into one IPU executable) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from poprt_lite.cli import poprt_flags
from poprt_lite.errors import PoprtError

PARAMETER_NAMES = {"passes": "passes_"}  # flag name -> convert's parameter name, where they differ


def load(path: Path) -> dict[str, Any]:
    import yaml  # PopRT's config format; imported only when a file is given

    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PoprtError(f"config file '{path}' does not exist; check --config_yaml") from None
    except yaml.YAMLError as exc:
        raise PoprtError(f"config file '{path}' is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PoprtError(f"config file '{path}' must be a mapping of flag names to values, got a {type(values).__name__}")
    return values


def merge(ctx: typer.Context, args: dict[str, Any], path: Path) -> dict[str, Any]:
    """`args` (convert's parameters) with the file's values for the flags the command line left unset."""
    values = load(path)
    if "model_fusion" in values:
        raise PoprtError(f"config file '{path}': model_fusion is not supported: it fuses several models into one IPU executable; convert each model and run one runner per model")
    params = {p.name: p for p in ctx.command.params}
    merged = dict(args)
    ignored = {}
    for key, value in values.items():
        name = PARAMETER_NAMES.get(key, key)
        if key in poprt_flags.BY_NAME and poprt_flags.BY_NAME[key].status != poprt_flags.IMPLEMENTED:
            ignored[key] = value
            continue
        if name not in merged or name == "config_yaml":
            raise PoprtError(f"config file '{path}': unknown key '{key}'; keys are flag names without dashes, e.g. input_model, input_shape, precision")
        if ctx.get_parameter_source(name).name != "DEFAULT":
            continue  # the command line says otherwise
        param = params[name]
        if isinstance(value, dict):  # input_shape: {input_ids: [16, 256]}, pack_args: {max_valid_num: 40}
            value = [f"{k}={_text(v)}" for k, v in value.items()]
        if param.multiple and not isinstance(value, list):
            value = [value]
        if isinstance(value, list):
            value = [_text(v) for v in value]
        try:
            merged[name] = param.process_value(ctx, value)
        except Exception as exc:
            raise PoprtError(f"config file '{path}': bad value for {key}: {' '.join(str(exc).split())}") from None
    poprt_flags.apply(ignored)
    return merged


def _text(value: Any) -> str:
    """A YAML value as the command line spells it: lists comma-separated."""
    return ",".join(_text(v) for v in value) if isinstance(value, list) else str(value)
