"""What `--pack_args` says: the keys each pack mode takes, their defaults, and PopRT's other keys.

Table-driven: each mode's descriptor (runtime/modes.py) says which keys the mode needs and how a
key it may omit is derived from the dynamic input's `--input_shape` (B, S); `KEYS` says how each
key's value is read. A new mode is its descriptor (and any new key in `KEYS`).

PopRT's keys that poprt-lite does not need are accepted with a one-line notice saying why
(`POPRT_NOTICES`), never an error and never dropped silently; `dynamic_groups` names the dynamic
input. Defaults (documented in the README): in AttentionMask mode, which PopRT selects with
`--passes insert_attention_mask` and no `--pack_args`, `segment_max_size` is S (a request fills at
most one row) and `max_valid_num` is B*S (every request has at least one token: no cap beyond the
token slots; a runtime PackRunnerConfig may set a lower one). The graph of that mode does not
depend on either. Unpack/repack needs `max_valid_num` (the unpacked batch is a graph dimension);
its `segment_max_size` defaults to S. token_stream has no static shape (no `--input_shape`, hence no
defaults): it needs `max_valid_num`, `segment_max_size` and `max_tokens`, the most tokens one batch
holds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from poprt_lite import vocab
from poprt_lite.errors import PoprtError, option
from poprt_lite.runtime import modes

log = logging.getLogger(__name__)


def positive_int(key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PoprtError(f"{option('pack_args')} {key} must be a positive integer, got '{text}'") from None
    if value <= 0:
        raise PoprtError(f"{option('pack_args')} {key} must be a positive integer, got {value}")
    return value


def segment_size(key: str, text: str) -> int:
    if "+" in text:  # PopRT: segment_max_size=13+51, two segments per request
        raise PoprtError(
            f"{option('pack_args')} {key}={text} gives several segments per request (PopRT's multi-segment packing), which poprt-lite does not do; give one size"
        )
    return positive_int(key, text)


def pack_mode(key: str, text: str) -> str:
    return modes.get(text, f"{option('pack_args')} {key}").name


def dynamic_groups(key: str, text: str) -> list[list[str]]:
    """PopRT's `dynamic_groups=[[input_ids,]]`: groups of inputs sharing the packed dimension."""
    groups = [[name for name in re.split(r"[\s,'\"]+", inner) if name] for inner in re.findall(r"\[([^\[\]]*)\]", text)]
    if not groups or not groups[0]:
        raise PoprtError(f"{option('pack_args')} {key} must name the dynamic input, e.g. {key}=[[input_ids,]], got '{text}'")
    return groups


KEYS: dict[str, Callable[[str, str], Any]] = {
    "mode": pack_mode,
    "max_valid_num": positive_int,
    "segment_max_size": segment_size,
    "max_tokens": positive_int,
    "dynamic_groups": dynamic_groups,
}


# PopRT's keys that poprt-lite does not need, and why (printed once per conversion as a notice).
POPRT_NOTICES = {
    "head_pattern": "not needed: poprt-lite finds the model's head and each output's layout by the graph's structure",
    "enable_double_batch_unpack": "not needed: it arranges the IPU's unpack in two half batches; onnxruntime unpacks in one",
}


@dataclass(frozen=True)
class PackArgs:
    """`--pack_args` resolved: the mode, every key the mode needs, and the dynamic input."""

    mode: str  # the mode's descriptor name (runtime/modes.py)
    values: dict[str, int]
    input_name: str = vocab.INPUT_IDS

    def spec(self) -> vocab.PackSpec:
        return vocab.PackSpec(mode=self.mode, **self.values)


def parse(pack_args: Mapping[str, str], input_shape: Mapping[str, tuple[int, ...]], mode: str | None = None) -> PackArgs:
    """Read `--pack_args` for `mode` (given by a packing pass in --passes) or its own `mode=` key."""
    unknown = sorted(set(pack_args) - set(KEYS) - set(POPRT_NOTICES))
    if unknown:
        raise PoprtError(f"unknown {option('pack_args')} key '{unknown[0]}'; known keys: {', '.join([*KEYS, *POPRT_NOTICES])}")
    parsed = {key: KEYS[key](key, text) for key, text in pack_args.items() if key in KEYS}
    for key in sorted(set(pack_args) & set(POPRT_NOTICES)):
        log.warning("%s %s: %s", option("pack_args"), key, POPRT_NOTICES[key])
    chosen = parsed.pop("mode", None)
    if mode is not None and chosen is not None and chosen != mode:
        raise PoprtError(f"{option('pack_args')} mode={chosen} contradicts the packing pass in {option('passes')}, which packs in {mode} mode; drop one")
    mode = chosen or mode or vocab.DEFAULT_PACK_MODE
    input_name = vocab.INPUT_IDS
    groups = parsed.pop("dynamic_groups", None)
    if groups is not None:
        input_name = groups[0][0]
        others = [name for group in groups for name in group][1:]
        if others:
            log.warning(
                "%s dynamic_groups: packs by '%s'; %s follow it by their role (no need to list them)", option("pack_args"), input_name, ", ".join(others)
            )
    rules = modes.get(mode)
    if not rules.static and input_shape:
        raise PoprtError(
            f"{option('input_shape')} pins a static shape, but {option('pack_args')} mode={mode} keeps the token dimension dynamic; "
            f"drop {option('input_shape')}"
        )
    shape = input_shape.get(input_name)
    values = {}
    for key in rules.needed:
        if key in parsed:
            values[key] = parsed.pop(key)
        elif isinstance(rules.defaults.get(key), int):
            values[key] = rules.defaults[key]
        elif key in rules.defaults and shape is not None and len(shape) >= 2:
            values[key] = rules.defaults[key](shape[:2])
        else:
            derive = f", or {option('input_shape')} {input_name}=B,S to derive it" if key in rules.defaults else ""
            raise PoprtError(f"{option('pack_args')} needs {key}=N (e.g. {option('pack_args')} {rules.example}){derive}")
    if parsed:
        extra = sorted(parsed)[0]
        raise PoprtError(f"{option('pack_args')} {extra} does not apply to {mode} mode; drop it")
    return PackArgs(mode=mode, values=values, input_name=input_name)
