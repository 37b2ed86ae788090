"""One descriptor per packing mode: everything that differs between the modes, in one entry each.

A `ModeDescriptor` names the mode's packing pass, its host layout (a `BatchLayout` of
runtime/layouts.py), the `--pack_args` keys it needs and their defaults, whether its batches have a
static `[batch, seq]` shape (given by `--input_shape`) or are one dynamic `[1, T]` stream, and
whether a configured runner may lower its `max_valid_num`. The compiler, the passes, the runtime,
`--check`, the bench and the applications ask the descriptor of an artifact's mode (`get`) instead
of comparing pack modes.

A new mode is one descriptor (`register`), one pass and one layout (or the pass and layout of an
existing mode: tests/runtime/test_modes.py registers a variant of token_stream from the test file).
Built-in modes are named by `vocab.PackMode`; a registered one by its own `name`, which the artifact's
manifest records like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from poprt_lite.errors import PoprtError
from poprt_lite.runtime.layouts import BatchLayout, PaddedRows, SegmentRows, StreamAcrossRows, TokenStream
from poprt_lite.runtime.packing import PackAlgorithm
from poprt_lite.vocab import Layout, PackMode

Shape = tuple[int, int]  # the dynamic input's (B, S) from --input_shape


@dataclass(frozen=True)
class ModeDescriptor:
    """What is specific to one packing mode (see the module docstring)."""

    name: str  # `--pack_args mode=NAME`, and the manifest's pack mode
    pass_name: str  # the packing pass (passes registry name)
    layout: type[BatchLayout]  # how the host lays out a batch and splits its outputs
    needed: tuple[str, ...]  # the --pack_args keys a compiled model depends on
    # Defaults of keys a user may omit: a number, or derived from the dynamic input's (B, S).
    defaults: Mapping[str, int | Callable[[Shape], int]] = field(default_factory=dict)
    # Static `[batch, seq]` batches (--input_shape gives them); else one dynamic `[1, T]` stream of
    # at most max_tokens tokens and a dynamic request dim, which --input_shape would pin.
    static: bool = True
    token_output: Layout = Layout.unpacked  # how the mode's per-token outputs hold the requests
    # The graph does not depend on max_valid_num (only a per-request head's slots do): a runner's
    # PackRunnerConfig may lower it.
    config_lowers_max_valid_num: bool = False
    example: str = "max_valid_num=40 segment_max_size=256"  # --pack_args, for the message of a missing key
    label: str = ""  # the bench's name of the mode
    online_algorithms: tuple[PackAlgorithm, ...] = (PackAlgorithm.first_fit,)  # the bench's online runs
    # Attention pads every request to the batch's longest: a PackRunner runs a batch of mixed
    # lengths as several model calls of similar lengths (runtime/packing.length_groups).
    length_groups: bool = False

    @property
    def one_row(self) -> bool:
        """Each request lies inside one row (its length bounded by the row's), in PopRT's single-row mode."""
        return not self.layout.across_rows

    def layout_for(self, batch_size: int, seq_len: int, max_valid_num: int | None = None, dynamic_rows: bool = False) -> BatchLayout:
        return self.layout(batch_size, seq_len, max_valid_num, dynamic_rows, mode=self.name)


_MODES: dict[str, ModeDescriptor] = {}


def register(descriptor: ModeDescriptor) -> ModeDescriptor:
    """Make a mode known to every layer; its name must be new."""
    if descriptor.name in _MODES:
        raise PoprtError(f"pack mode '{descriptor.name}' is registered already")
    _MODES[descriptor.name] = descriptor
    return descriptor


def unregister(name: str) -> None:
    del _MODES[name]


def registered() -> tuple[ModeDescriptor, ...]:
    """Every known mode, built-in ones first, in the order they were registered."""
    return tuple(_MODES.values())


def names() -> tuple[str, ...]:
    return tuple(_MODES)


def get(name: str, what: str = "pack mode") -> ModeDescriptor:
    """The descriptor of mode `name`; an unknown name raises PoprtError naming `what` and the known modes."""
    descriptor = _MODES.get(str(name))
    if descriptor is None:
        raise PoprtError(f"{what} must be one of {', '.join(_MODES)}, got '{name}'")
    return descriptor


def layout_for(
    mode: str | None, batch_size: int, seq_len: int, max_valid_num: int | None = None, dynamic_rows: bool = False
) -> BatchLayout:
    """The batch layout of an artifact compiled for `mode` (None: not packed, one request per row),
    with rows that follow the batch if it was compiled with `--dynamic_rows`."""
    if mode is None:
        return PaddedRows(batch_size, seq_len, max_valid_num, dynamic_rows)
    return get(mode).layout_for(batch_size, seq_len, max_valid_num, dynamic_rows)


def of_pass(pass_name: str) -> ModeDescriptor | None:
    """The mode a packing pass packs for when named on its own (the first registered with it), or None."""
    return next((d for d in _MODES.values() if d.pass_name == pass_name), None)


def for_across_rows(across_rows: bool) -> ModeDescriptor:
    """PopRT's `pack_data(across_rows=...)`: the first mode whose requests may (or may not) cross rows."""
    return next(d for d in _MODES.values() if d.static and d.layout.across_rows == across_rows)


UNPACK_REPACK = register(ModeDescriptor(
    name=PackMode.unpack_repack,
    pass_name="pack_unpack_repack",
    layout=StreamAcrossRows,
    needed=("max_valid_num", "segment_max_size"),
    defaults={"segment_max_size": lambda shape: shape[1]},
    label="unpack/repack",
))
ATTENTION_MASK = register(ModeDescriptor(
    name=PackMode.attention_mask,
    pass_name="attention_mask_packing",
    layout=SegmentRows,
    needed=("max_valid_num", "segment_max_size"),
    defaults={"max_valid_num": lambda shape: shape[0] * shape[1], "segment_max_size": lambda shape: shape[1]},
    token_output=Layout.packed,
    config_lowers_max_valid_num=True,
    label="AttentionMask",
    online_algorithms=(PackAlgorithm.first_fit, PackAlgorithm.next_fit),
))
TOKEN_STREAM = register(ModeDescriptor(
    name=PackMode.token_stream,
    pass_name="token_stream_packing",
    layout=TokenStream,
    needed=("max_valid_num", "segment_max_size", "max_tokens"),
    static=False,
    token_output=Layout.stream,
    example=f"mode={PackMode.token_stream} max_valid_num=40 segment_max_size=256 max_tokens=4096",
    label="token stream",
    length_groups=True,
))
# token_stream to the host (layout, feeds, outputs); only the graph's attention differs
TOKEN_STREAM_LOOP = register(dataclasses.replace(
    TOKEN_STREAM,
    name=PackMode.token_stream_loop,
    pass_name="token_stream_loop_packing",
    length_groups=False,  # each request attends at its own length already
    example=f"mode={PackMode.token_stream_loop} max_valid_num=40 segment_max_size=256 max_tokens=4096",
    label="token stream, attention per request",
))
